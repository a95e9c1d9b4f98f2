"""The packed-file reader checks everything a file says before anything runs: each defect is one
PackedModelError (exit 2 in `qnas upscale`) naming the file and the node; a file it accepts runs and
gives a finite image of the declared scale. Hypothesis mutates single fields of a valid file."""

import copy
import json
import math

import pytest
import torch
from cli_run import run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from qnas.deploy import PackedModel, PackedModelError, read_packed
from qnas.deploy.format import FORMAT


@pytest.fixture(scope="module")
def packed():
    """(graph, tensors) of a tiny FQSR edsr-baseline x2 (8 features, 1 block), never trained."""
    from qnas.export import packed_graph
    from qnas.quant.apply import quantize_network
    from qnas.sr import build_model

    torch.manual_seed(0)
    m = build_model("edsr-baseline", 2, n_resblocks=1, n_feats=8)
    quantize_network(m, {"scheme": "fqsr", "bits": 4, "warmup": 0})
    m.eval()
    m(torch.rand(1, 3, 12, 12))  # initializes the quantizers' steps
    return packed_graph(m, 2)


def write_unchecked(path, graph, tensors):
    """A packed file as a careless or hostile writer makes it (format.write_packed would refuse)."""
    meta = {"format": FORMAT, "graph": json.dumps(graph)}
    path.write_bytes(save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta))
    return path


def _node(graph, op, k=0):
    return [n for n in graph["nodes"] if n["op"] == op][k]


def _set(path):
    """A mutation setting graph[path...] = value."""

    def apply(graph, tensors, value):
        obj = graph
        for p in path[:-1]:
            obj = obj[p]
        obj[path[-1]] = value

    return apply


def _conv_field(k, field, value):
    def apply(graph, tensors):
        _node(graph, "conv", k)[field] = value

    return apply


def _tensor(op, role, make, k=0):
    def apply(graph, tensors):
        key = _node(graph, op, k)["tensors"][role]
        tensors[key] = make(tensors[key])

    return apply


def _rewire_tail(graph, tensors):
    """The last conv (8 -> 3 channels) fed by the upsampler conv's 32-channel output, before the shuffle."""
    convs = [n for n in graph["nodes"] if n["op"] == "conv"]
    convs[-1]["inputs"] = [convs[-2]["output"]]


def _duplicate_output(graph, tensors):
    graph["nodes"][2]["output"] = graph["nodes"][1]["output"]


DEFECTS = {
    "stride 0": (_conv_field(1, "stride", [0, 0]), "stride must be two integers in 1..64"),
    "huge stride": (_conv_field(1, "stride", [10**9, 10**9]), "stride must be two integers in 1..64"),
    "negative padding": (_conv_field(1, "padding", [-1, 1]), "padding must be two integers"),
    "huge padding": (_conv_field(1, "padding", [10**6, 10**6]), "padding must be two integers"),
    "channel mismatch": (_rewire_tail, "takes 8 input channels (w_shape), its input has 32"),
    "input channels": (
        lambda g, t: _set(["input", "channels"])(g, t, 4),
        "does not broadcast over 4 channels",
    ),
    "huge shuffle": (
        lambda g, t: _node(g, "pixel_shuffle").update(factor=10**6),
        "factor must be an integer",
    ),
    "scale": (lambda g, t: _set(["scale"])(g, t, 3), '"scale" is 3 but the nodes upscale by 2'),
    "w_scale size": (_tensor("conv", "w_scale", lambda v: torch.ones(v.numel() + 1)), "positive finite step"),
    "bias size": (_tensor("conv", "bias", lambda v: v[:-1].clone()), "bias must have"),
    "weight bytes": (_tensor("conv", "weight", lambda v: v[:-4].clone()), "packed weight of"),
    "w_bits": (_conv_field(0, "w_bits", 9), "w_bits 9 outside 1..8"),
    "quantize bits": (lambda g, t: _node(g, "quantize").update(bits=40), "bits 40 outside 1..16"),
    "nan step": (_tensor("conv", "a_scale", lambda v: torch.full_like(v, math.nan)), "non-finite"),
    "inf constant": (_tensor("add_const", "value", lambda v: torch.full_like(v, math.inf)), "non-finite"),
    "value shape": (_tensor("add_const", "value", lambda v: torch.zeros(1, 3, 2, 2)), "does not broadcast"),
    "nan mul": (
        lambda g, t: g["nodes"].insert(
            1,
            {
                "op": "mul_const",
                "name": "m",
                "inputs": [g["nodes"][0]["output"]],
                "output": "m_out",
                "value": math.nan,
            },
        ),
        "finite number",
    ),  # fmt: skip
    "clamp order": (lambda g, t: _node(g, "clamp").update(min=2.0, max=1.0), "min <= max"),
    "duplicate value": (_duplicate_output, "is already defined"),
    "signed": (_conv_field(0, "a_signed", "yes"), "a_signed must be true or false"),
    "many nodes": (lambda g, t: g["nodes"].extend([copy.deepcopy(_node(g, "clamp"))] * 20000), "nodes, more"),
}


@pytest.mark.parametrize("defect", sorted(DEFECTS))
def test_each_defect_is_one_line_naming_file_and_node(packed, tmp_path, capsys, defect):
    mutate, needle = DEFECTS[defect]
    graph, tensors = copy.deepcopy(packed[0]), dict(packed[1])
    mutate(graph, tensors)
    path = write_unchecked(tmp_path / "bad.qnp", graph, tensors)
    with pytest.raises(PackedModelError, match=None) as e:
        read_packed(path)
    msg = str(e.value)
    assert needle in msg and msg.startswith(str(path)), msg
    if defect not in ("scale", "many nodes"):  # graph-level defects name the graph, not a node
        assert "node " in msg or "graph:" in msg, msg
    img = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (6, 5)).save(img)
    code, _, err = run_cli(["upscale", "--model", path, img, tmp_path / "o.png", "--quiet"], capsys)
    assert code == 2 and err.count("\n") == 1 and needle in err, err
    assert not (tmp_path / "o.png").exists()


def test_the_valid_file_passes(packed, tmp_path):
    path = write_unchecked(tmp_path / "ok.qnp", *packed)
    m = PackedModel.load(path)
    y = m(torch.rand(1, 3, 7, 9))
    assert y.shape == (1, 3, 14, 18) and bool(torch.isfinite(y).all())


_FIELDS = ["stride", "padding", "w_bits", "a_bits", "a_signed", "w_shape", "bits", "factor", "value", "slope",
           "min", "max", "inputs", "output", "op", "signed"]  # fmt: skip
_VALUES = st.one_of(
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.text(max_size=4),
    st.lists(st.integers(-5, 10**7), max_size=5),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(node=st.integers(0, 200), field=st.sampled_from(_FIELDS), value=_VALUES, top=st.booleans())
def test_mutated_files_are_refused_or_run(packed, tmp_path, node, field, value, top):
    graph, tensors = copy.deepcopy(packed[0]), dict(packed[1])
    if top:
        graph[["scale", "output", "input", "nodes"][node % 4]] = value
    else:
        graph["nodes"][node % len(graph["nodes"])][field] = value
    path = write_unchecked(tmp_path / "m.qnp", graph, tensors)
    try:
        g, t = read_packed(path)
    except PackedModelError as e:
        assert str(e).startswith(str(path)) and "\n" not in str(e)
        return
    y = PackedModel(g, t)(torch.rand(1, 3, 8, 8))  # accepted: it must run, at its declared scale
    s = g["scale"]
    assert y.shape == (1, 3, 8 * s, 8 * s) and bool(torch.isfinite(y).all())
