"""torch.compile(fullgraph=True) of the networks qnas trains: once the quantizers have seen data, a training
forward and backward is one graph (no break, no host sync) and computes what eager mode computes."""

import copy

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

from qnas.nas.derive import DerivedNetwork, uniform_genotype
from qnas.nas.graph import compile_space
from qnas.nas.supernet import Supernet
from qnas.quant.dqss import build_supernet, derive_network, derive_plan
from qnas.runs.network import build_network
from qnas.sr import build_model

TINY = {"n_resblocks": 1, "n_feats": 8}
GENOTYPE_SPACE = {
    "name": "tiny",
    "channels": 6,
    "candidates": ["conv3x3", "conv3x1_1x3"],
    "cells": {"block": [{"name": "a", "op": "layer", "out": "c"}, {"name": "b", "op": "layer", "out": "c"}]},
    "network": [
        {"name": "head", "op": "layer", "out": "c"},
        {"name": "body", "op": "residual", "cell": "block"},
        {"name": "up", "op": "layer", "out": "colors*scale*scale"},
        {"name": "ps", "op": "pixel_shuffle"},
    ],
}


def _fqsr():
    return build_network(
        {
            "kind": "sr",
            "model": {"name": "edsr-baseline", "scale": 2, "kwargs": TINY},
            "quant": {"scheme": "fqsr", "bits": 4, "warmup": 2},
        }
    )


def _derived():
    g = uniform_genotype(GENOTYPE_SPACE, 2, "conv3x1_1x3", 4)
    g["layers"]["head"] = {"op": "conv3x3", "w_bits": 8, "a_bits": 8}
    return DerivedNetwork(g)


def _dqss_supernet():
    return build_supernet(build_model("edsr-baseline", 2, **TINY), ["lsq", "pact", "mse"], 4)


def _dqss_derived():
    fp = build_model("edsr-baseline", 2, **TINY)
    sup = build_supernet(copy.deepcopy(fp), ["lsq", "mse"], 4)
    sup(torch.rand(1, 3, 12, 12))
    return derive_network(sup, fp, derive_plan(sup, ["lsq", "mse"], 4))


def _supernet(mode):
    def make():
        space = {**GENOTYPE_SPACE, "candidates": ["conv1x1", "conv3x3", "conv3x1_1x3"], "anchor": "nearest"}
        return Supernet(compile_space(space, 2), mode=mode)

    make.__name__ = f"supernet_{mode}"
    return make


@pytest.mark.parametrize(
    "make", [_fqsr, _derived, _dqss_supernet, _dqss_derived, _supernet("noise"), _supernet("quant")]
)
def test_training_step_compiles_to_one_graph(make):
    # As qnas.runs.loop.compile_network sets it: the supernet's noise seed is a traced .item().
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        _check_one_graph(make)


def _check_one_graph(make):
    torch.manual_seed(0)
    net = make().train()
    x = torch.rand(2, 3, 12, 12)
    for _ in range(3):  # initialisation and warm-up run eagerly, as `--compile` does
        net(x)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(net, backend=counter, fullgraph=True)
    eager_net = make().train()
    eager_net.load_state_dict(net.state_dict())
    torch.manual_seed(5)  # the same noise in both (the supernet's noise mode draws its seeds from torch)
    y = compiled(x)
    torch.manual_seed(5)
    y_ref = eager_net(x)
    torch.testing.assert_close(y, y_ref)
    y.abs().mean().backward()
    y_ref.abs().mean().backward()
    for (name, p), q in zip(net.named_parameters(), eager_net.parameters(), strict=True):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, msg=name)
    # fullgraph=True made any graph break an error; the output quantizer (a forward hook of the root module)
    # is compiled as a frame of its own. The next steps reuse both graphs: no recompilation.
    frames = counter.frame_count
    assert frames == (2 if hasattr(net, "output_quant") else 1)
    compiled(x)
    compiled(x)
    assert counter.frame_count == frames


def test_train_with_compile_gives_the_same_weights(tmp_path, monkeypatch):
    """`qnas train --compile`: eager warm-up steps, then the compiled network; the run's weights equal the
    eager run's (the aot_eager backend here, to keep the test fast; the flag uses inductor)."""
    from qnas.runs import loop as loop_module
    from qnas.train.train import TrainOptions, train

    def compile_network(net):
        with torch._dynamo.config.patch(capture_scalar_outputs=True):
            return torch.compile(net, backend="aot_eager", fullgraph=True)

    monkeypatch.setattr(loop_module, "compile_network", compile_network)
    network = {
        "kind": "sr",
        "model": {"name": "edsr-baseline", "scale": 2, "kwargs": TINY},
        "quant": {"scheme": "fqsr", "bits": 4, "warmup": 2},
    }
    opts = TrainOptions(steps=6, batch_size=2, patch_size=16, checkpoint_every=6)
    train(network, opts, tmp_path / "eager", progress=False)
    train(network, opts, tmp_path / "compiled", progress=False, compile=True)
    a = torch.load(tmp_path / "eager" / "model.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "compiled" / "model.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def aot_eager(monkeypatch):
    """`--compile` with the aot_eager backend (fast to compile; the flag uses inductor)."""
    from qnas.runs import loop as loop_module

    monkeypatch.setattr(
        loop_module, "compile_network", lambda net: torch.compile(net, backend="aot_eager", fullgraph=True)
    )
    # Dynamo's caches are per code object (EDSR.forward, ...): the networks of earlier tests in this
    # process would count towards the recompile limit of these runs.
    torch._dynamo.reset()
    with torch._dynamo.config.patch(capture_scalar_outputs=True):  # as compile_network sets it
        yield
    torch._dynamo.reset()


def _same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("mode", ["noise", "quant"])
def test_search_with_compile_gives_the_same_genotype(tmp_path, aot_eager, mode):
    """`qnas search --compile`: the supernet's forwards compiled after the eager warm-up steps; the
    genotype and the weights equal the eager search's."""
    import json

    from test_nas_supernet import tiny_space

    from qnas.nas.search import SearchOptions, search

    space = tmp_path / "space.json"
    space.write_text(json.dumps(tiny_space(["conv1x1", "conv3x3", "conv3x1_1x3"])))
    opts = SearchOptions(
        space=str(space), scale=2, steps=6, batch_size=2, patch_size=16, mode=mode, alpha_lr=0.05
    )
    opts.checkpoint_every, opts.lr_size = 6, [16, 16]
    for name, compile in (("eager", False), ("compiled", True)):
        search(opts, tmp_path / name, progress=False, compile=compile)
    a, b = (json.loads((tmp_path / n / "genotype.json").read_text()) for n in ("eager", "compiled"))
    assert a["layers"] == b["layers"]
    a, b = (torch.load(tmp_path / n / "checkpoint.pt", weights_only=True) for n in ("eager", "compiled"))
    _same_state(a["model"], b["model"])


@pytest.mark.parametrize("mode", ["ptq", "qat"])
def test_strategy_with_compile_gives_the_same_network(tmp_path, aot_eager, mode):
    """`qnas strategy --compile`: supernet and derived network compiled after their eager warm-up steps;
    the chosen strategies and the derived network's weights equal the eager search's.

    At one thread: with two, a reduction of the compiled graph can be split across the threads in
    another order than eager's (seen on an Intel Xeon), and the PTQ search's discrete choices turn a
    last-bit difference into another network."""

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _strategy_compiled_equals_eager(tmp_path, mode)
    finally:
        torch.set_num_threads(threads)


def _strategy_compiled_equals_eager(tmp_path, mode: str) -> None:
    import json

    from qnas.train.strategy import StrategyOptions, run_strategy
    from qnas.train.train import TrainOptions, train

    fp = tmp_path / "fp"
    network = {"kind": "sr", "model": {"name": "edsr-baseline", "scale": 2, "kwargs": TINY}}
    train(network, TrainOptions(steps=1, batch_size=2, patch_size=16), fp, progress=False)
    # 16 steps: both the supernet and the derived network (ptq: the second half, qat: the last quarter)
    # run compiled steps after their eager ones.
    opts = StrategyOptions(
        4, ["lsq", "pact", "mse"], mode=mode, steps=16, calib_batches=2, batch_size=2, patch_size=16
    )
    opts.discrete_fraction = 0.5
    for name, compile in (("eager", False), ("compiled", True)):
        run_strategy(str(fp), opts, tmp_path / name, progress=False, compile=compile)
    a, b = (json.loads((tmp_path / n / "strategy.json").read_text()) for n in ("eager", "compiled"))
    assert a["counts"] == b["counts"] and a["layers"] == b["layers"]
    a, b = (torch.load(tmp_path / n / "model.pt", weights_only=True) for n in ("eager", "compiled"))
    _same_state(a["model"], b["model"])
