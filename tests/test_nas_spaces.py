"""Search spaces as data (qnas.spaces, qnas.nas.graph): builtin spaces, the documented example, and the
one-line errors of malformed spaces."""

import copy
from pathlib import Path

import pytest
import torch

from qnas.errors import QnasError
from qnas.nas.graph import compile_space, op_macs_per_pixel
from qnas.nas.supernet import Supernet
from qnas.spaces import BUILTIN_OPS, list_spaces, load_space, with_anchor

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "docs" / "examples" / "space_edsr_small.json"


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny shapes gain nothing from a second thread, and on a shared machine it waits for a core at every
    parallel region."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_basic_space_structure(scale):
    c = compile_space(load_space("basic"), scale)
    assert c.space["channels"] == 36
    # 2 head layers, 3 cells x (skip + 3 layers), upsampler, 2 tail layers; the cells share 4 slots.
    assert len(c.sites) == 2 + 3 * 4 + 1 + 2
    assert list(c.slots) == [
        "head1", "head2", "cell.skip", "cell.conv1", "cell.conv2", "cell.conv3", "upsample", "tail.conv1", "tail.conv2",
    ]  # fmt: skip
    assert len(c.slot_sites("cell.conv1")) == 3
    assert c.slots["head1"] == ["conv1x1", "conv3x3", "conv5x5", "conv3x1_1x3", "conv5x1_1x5", "conv3x3_g3"]
    up = c.slot_sites("upsample")[0]
    assert (up.in_ch, up.out_ch, up.pixels) == (36, 3 * scale * scale, 1)
    tail = c.slot_sites("tail.conv1")[0]
    assert (tail.in_ch, tail.out_ch, tail.pixels) == (3, 3, scale * scale)


def test_rfdn_space_structure():
    c = compile_space(load_space("rfdn"), 4)
    assert c.space["channels"] == 48
    assert len(c.slot_sites("rfdb.d1")) == 4  # four RFDB-style cells share their slots
    d1 = c.slot_sites("rfdb.d1")[0]
    assert (d1.in_ch, d1.out_ch) == (48, 24)
    fuse = c.slot_sites("rfdb.fuse")[0]
    assert (fuse.in_ch, fuse.out_ch, fuse.candidates) == (96, 48, ["conv1x1"])
    assert c.slot_sites("trunk.fuse")[0].in_ch == 4 * 48
    assert "growth2_3x3" in c.slots["rfdb.r1"]


@pytest.mark.parametrize("name", list_spaces() + [str(EXAMPLE)])
def test_supernets_run_on_a_small_input(name):
    torch.manual_seed(0)
    net = Supernet(compile_space(load_space(name), 2), mode="quant")
    y = net(torch.rand(1, 3, 6, 6))
    assert y.shape == (1, 3, 12, 12) and torch.isfinite(y).all()


def test_op_macs():
    assert op_macs_per_pixel(BUILTIN_OPS["conv3x3"], 36, 36) == 36 * 36 * 9
    assert op_macs_per_pixel(BUILTIN_OPS["conv3x3_g3"], 36, 36) == 36 * 12 * 9
    assert op_macs_per_pixel(BUILTIN_OPS["conv3x1_1x3"], 36, 36) == 2 * 36 * 36 * 3
    assert op_macs_per_pixel(BUILTIN_OPS["growth2_3x3"], 48, 24) == 48 * 48 * 9 + 24 * 48


def test_ops_override_gives_one_candidate_per_layer():
    c = compile_space(load_space("rfdn"), 2, ["conv3x3"])
    assert c.slots["rfdb.r1"] == ["conv3x3"]
    assert c.slots["rfdb.fuse"] == ["conv1x1"]  # layers that name their own candidates keep them


def _tiny():
    return {
        "name": "tiny",
        "channels": 6,
        "candidates": ["conv1x1", "conv3x3"],
        "network": [
            {"name": "head", "op": "layer", "out": "c"},
            {"name": "up", "op": "layer", "out": "colors*scale*scale"},
            {"name": "ps", "op": "pixel_shuffle"},
        ],
    }


def _with(change):
    s = _tiny()
    change(s)
    return s


@pytest.mark.parametrize(
    "space, needle",
    [
        (_with(lambda s: s.update(candidates=["conv9x9"])), "unknown op 'conv9x9'"),
        (_with(lambda s: s["network"][0].update(inputs=["nowhere"])), "input 'nowhere'"),
        (_with(lambda s: s["network"][0].update(op="magic")), "op 'magic'"),
        (_with(lambda s: s["network"][0].update(out="c**2")), "c**2"),
        (_with(lambda s: s["network"][0].update(out="d")), "unknown name 'd'"),
        (_with(lambda s: s.update(ops={"bad": {"kernel": 2}})), "odd"),
        (_with(lambda s: s.update(candidates=["conv3x3_g3"], channels=4)), "groups=3"),
        (_with(lambda s: (s["network"].pop(), s["network"][1].update(out="colors"))), "does not upscale"),
        (_with(lambda s: s["network"][1].update(out="c*scale*scale")), "ends with"),
        (_with(lambda s: s.pop("channels")), 'missing "channels"'),
        (
            _with(
                lambda s: s.update(
                    cells={"a": [{"name": "x", "op": "cell", "cell": "a"}]},
                    network=[{"name": "x", "op": "cell", "cell": "a"}],
                )
            ),
            "contains itself",
        ),
    ],
)
def test_bad_spaces_are_one_line_errors(space, needle):
    with pytest.raises(QnasError) as e:
        compile_space(load_space(space), 2)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_unknown_space_name():
    with pytest.raises(QnasError, match="unknown search space 'nope'"):
        load_space("nope")


def test_space_file_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(QnasError, match="not valid JSON"):
        load_space(str(bad))


def test_load_space_returns_a_copy():
    a = load_space("basic")
    a["channels"] = 1
    assert load_space("basic")["channels"] == 36
    d = _tiny()
    load_space(d)["channels"] = 99
    assert d == _tiny() and copy.deepcopy(d) == d


@pytest.mark.parametrize("name", list_spaces())
def test_builtin_spaces_have_the_anchor_and_without_it_are_the_papers(name):
    space = load_space(name)
    assert space["anchor"] == "nearest"
    paper = with_anchor(space, None)
    assert paper["anchor"] is None and space["anchor"] == "nearest"  # a copy
    assert compile_space(paper, 2).graph.anchor is None
    assert compile_space(space, 3).graph.anchor == "nearest" and compile_space(space, 3).graph.scale == 3


def test_bad_anchor_is_a_one_line_error():
    with pytest.raises(QnasError, match='"anchor" must be null or one of nearest') as e:
        load_space(_with(lambda s: s.update(anchor="bicubic")))
    assert "\n" not in str(e.value)
    with pytest.raises(QnasError, match="anchor"):
        with_anchor(_tiny(), "bilinear")
