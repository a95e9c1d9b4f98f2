"""Benchmark conventions (see bench/report.py): each case times one implementation on inputs shared
with the other cases of its group; `impl` names it, `baseline=True` marks what speedups are relative to,
`bytes`/`ops` give the memory traffic / arithmetic of one call for GB/s and GOP/s."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import qops  # noqa: E402,F401


@pytest.fixture
def bench(benchmark):
    def run(fn, *, group, impl, baseline=False, bytes=None, ops=None, sync=None, rounds=15, **info):
        benchmark.group = group
        benchmark.extra_info.update(impl=impl, baseline=baseline, bytes=bytes, ops=ops, **info)
        benchmark.extra_info["threads"] = torch.get_num_threads()

        def call():
            out = fn()
            if sync is not None:
                sync()
            return out

        return benchmark.pedantic(call, warmup_rounds=2, rounds=rounds, iterations=1)

    return run


# Suites that time 1 thread beside the default count take this fixture; it yields the label for the group.
THREADS = sorted({torch.get_num_threads(), 1}, reverse=True)


@pytest.fixture(params=THREADS, ids=lambda n: f"{n}thr")
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield f"{request.param} thread" + ("s" if request.param > 1 else "")
    torch.set_num_threads(before)
