"""Example counts of the op tests' hypothesis fuzzers: QOPS_HYPOTHESIS_EXAMPLES=N runs N examples in every one
(`make asan` runs fewer, a local search more); unset, each fuzzer runs its own default."""

import os


def examples(default: int) -> int:
    return int(os.environ.get("QOPS_HYPOTHESIS_EXAMPLES", default))
