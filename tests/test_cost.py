"""qnas.cost: MACs per layer against hand-computed values, params, BitOps, weight memory."""

import json

import pytest
import torch
from torch import nn

import qnas.sr as sr
from qnas.cost import count_cost, parse_lr_size
from qnas.errors import QnasError


def build_meta(name, scale, **kwargs):
    with torch.device("meta"):
        return sr.build_model(name, scale, **kwargs)


def conv_macs(h, w, cin, cout, k):
    return h * w * cout * cin * k * k


def edsr_baseline_x4_expected(h=48, w=48):
    """(layer name, MACs, params) of every conv of edsr-baseline x4, by hand."""
    c = 64
    rows = [("head.0", conv_macs(h, w, 3, c, 3), 3 * c * 9 + c)]
    for b in range(16):
        rows += [(f"body.{b}.body.{i}", conv_macs(h, w, c, c, 3), c * c * 9 + c) for i in (0, 2)]
    rows.append(("body.16", conv_macs(h, w, c, c, 3), c * c * 9 + c))
    rows.append(("tail.0.0", conv_macs(h, w, c, 4 * c, 3), c * 4 * c * 9 + 4 * c))
    rows.append(("tail.0.2", conv_macs(2 * h, 2 * w, c, 4 * c, 3), c * 4 * c * 9 + 4 * c))
    rows.append(("tail.1", conv_macs(4 * h, 4 * w, c, 3, 3), c * 3 * 9 + 3))
    return rows


def test_edsr_baseline_x4_per_layer_macs_by_hand():
    cost = count_cost(build_meta("edsr-baseline", 4), (48, 48))
    convs = [(lc.name, lc.macs, lc.params) for lc in cost.layers if lc.type == "Conv2d"]
    expected = edsr_baseline_x4_expected()
    assert convs == expected
    assert cost.params == 1_517_571 == sum(p for _, _, p in expected)
    assert cost.macs == sum(m for _, m, _ in expected) == 4_569_219_072
    assert cost.bitops == cost.macs * 32 * 32
    assert cost.weight_bytes == 4 * 1_517_571
    assert cost.model == "edsr-baseline" and cost.scale == 4 and cost.hr_size == [192, 192]
    tail = next(lc for lc in cost.layers if lc.name == "tail.1")
    assert tail.in_shape == [64, 192, 192] and tail.out_shape == [3, 192, 192] and tail.kernel == [3, 3]


def test_zero_mac_layers_are_listed():
    cost = count_cost(build_meta("edsr-baseline", 4), (8, 8))
    by_type = {}
    for lc in cost.layers:
        by_type.setdefault(lc.type, []).append(lc)
    assert len(by_type["Add"]) == 17 and len(by_type["PixelShuffle"]) == 2 and len(by_type["MeanShift"]) == 2
    for t in ("Add", "PixelShuffle", "MeanShift"):
        assert all(lc.macs == 0 and lc.bitops == 0 and lc.params == 0 for lc in by_type[t])
    assert [lc.name for lc in by_type["Add"]][-1] == "skip"


def test_bits_override():
    model = build_meta("edsr-baseline", 4)
    cost = count_cost(model, (48, 48), bits=8)
    assert cost.bitops == cost.macs * 64
    n_bias = 64 + 33 * 64 + 2 * 256 + 3  # head, 33 body convs, 2 upsampler convs, tail
    assert n_bias == sum(m.bias.numel() for m in model.modules() if isinstance(m, nn.Conv2d))
    assert cost.weight_bytes == (1_517_571 - n_bias) * 1 + n_bias * 4  # biases stay at 32 bits
    conv = next(lc for lc in cost.layers if lc.type == "Conv2d")
    assert (conv.w_bits, conv.a_bits) == (8, 8)
    with pytest.raises(QnasError, match="bits 0 must be in 1..32"):
        count_cost(build_meta("edsr-baseline", 4), (8, 8), bits=0)


class QConv(nn.Conv2d):
    """A quantized convolution as cost counting sees it: a conv that declares its bit-widths."""

    def __init__(self, *args, w_bits=4, a_bits=8, **kwargs):
        super().__init__(*args, **kwargs)
        self.w_bits, self.a_bits = w_bits, a_bits


def qconv(cin, cout, k, *, stride=1, padding=None, groups=1, bias=True):
    # 4-bit weights everywhere, full precision (0) for the first layer's activations.
    return QConv(
        cin,
        cout,
        k,
        stride=stride,
        padding=k // 2 if padding is None else padding,
        bias=bias,
        a_bits=0 if cin == 3 else 8,
    )


def test_module_bit_attributes_win_over_the_override():
    with torch.device("meta"):
        model = sr.build_model("edsr-baseline", 2, conv=qconv)
    cost = count_cost(model, (16, 16), bits=2)
    convs = [lc for lc in cost.layers if lc.type == "QConv"]
    assert convs[0].w_bits == 4 and convs[0].a_bits == 32  # 0 = full precision = 32 bits
    assert all((lc.w_bits, lc.a_bits) == (4, 8) for lc in convs[1:])
    assert cost.bitops == convs[0].macs * 4 * 32 + sum(lc.macs for lc in convs[1:]) * 4 * 8
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, QConv))
    biases = sum(m.bias.numel() for m in model.modules() if isinstance(m, QConv))
    assert cost.weight_bytes == weights * 4 / 8 + biases * 4


class MixedBlock(nn.Module):
    """A composite layer that declares its own MAC count; its inner convs are not counted again."""

    macs_per_output = 7

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 3, 3, padding=1)
        self.b = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return self.b(self.a(x))


class Shared(nn.Module):
    """One conv called twice plus BN and PReLU (parameters without MACs)."""

    def __init__(self):
        super().__init__()
        self.mix = MixedBlock()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.act = nn.PReLU()
        self.unused = nn.Linear(2, 2)
        self.fc = nn.Linear(3 * 4 * 4, 5)

    def forward(self, x):
        x = self.act(self.bn(self.conv(self.conv(self.mix(x)))))
        return self.fc(x.flatten(1))


def test_declared_macs_repeated_calls_and_unused_parameters():
    model = Shared()
    model.train()
    cost = count_cost(model, (4, 4))
    assert model.training and model.bn.training  # counting leaves the mode as it was
    names = [lc.name for lc in cost.layers]
    assert names == ["mix", "conv", "conv#2", "bn", "act", "fc"]
    rows = {lc.name: lc for lc in cost.layers}
    assert rows["mix"].macs == 3 * 4 * 4 * 7 and rows["mix"].params == (81 + 3) + (9 + 3)
    assert rows["conv"].macs == rows["conv#2"].macs == conv_macs(4, 4, 3, 3, 3)
    assert rows["conv"].params == 84 and rows["conv#2"].params == 0
    assert rows["bn"].params == 6 and rows["bn"].macs == 0 and rows["act"].params == 1
    assert rows["fc"].macs == 5 * 48 and rows["fc"].kernel is None
    assert cost.params == sum(p.numel() for p in model.parameters())
    assert cost.params == sum(lc.params for lc in cost.layers) + 6  # the unused Linear(2, 2)
    assert cost.weight_bytes == cost.params * 4


def test_srresnet_and_rfdn_totals_equal_the_model():
    for name in ("srresnet", "rfdn", "rfdn-paper"):
        model = build_meta(name, 3)
        cost = count_cost(model, (16, 16))
        assert (
            cost.params == sum(p.numel() for p in model.parameters()) == sum(lc.params for lc in cost.layers)
        )


@pytest.mark.parametrize("name, kwargs", [("rfdn", {"nf": 16, "n_blocks": 2}), ("srresnet", {"n_blocks": 2})])
def test_macs_equal_torch_flop_counter_on_cpu_and_meta(name, kwargs):
    """An independent count: torch's FlopCounterMode (2 FLOPs per multiply-add of every conv and matmul)
    on a real forward pass; the meta-device count (what `qnas cost` uses) gives the same report."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = sr.build_model(name, 2, **kwargs).eval()
    cpu = count_cost(model, (16, 20))
    with FlopCounterMode(display=False) as flops, torch.no_grad():
        model(torch.zeros(1, 3, 16, 20))
    assert cpu.macs * 2 == flops.get_total_flops() > 0
    assert count_cost(build_meta(name, 2, **kwargs), (16, 20)).to_dict() == cpu.to_dict()


def test_too_small_input_for_esa():
    with pytest.raises(QnasError, match="lr-size 8x8 is too small for rfdn"):
        count_cost(build_meta("rfdn", 2), (8, 8))


def test_json_serialisable():
    cost = count_cost(build_meta("srresnet", 2), (8, 8), bits=4)
    d = json.loads(cost.to_json())
    assert {"macs", "params", "bitops", "weight_bytes", "layers", "lr_size", "scale", "model"} <= set(d)
    assert set(d["layers"][0]) == {
        "name",
        "type",
        "in_shape",
        "out_shape",
        "kernel",
        "macs",
        "params",
        "w_bits",
        "a_bits",
        "bitops",
        "weight_bytes",
    }
    table = cost.format_table()
    assert "srresnet x2, LR 8x8 -> HR 16x16" in table and "total" in table


@pytest.mark.parametrize(
    "text, size", [("48x48", (48, 48)), ("48", (48, 48)), ("32X64", (32, 64)), (" 7x9 ", (7, 9))]
)
def test_parse_lr_size(text, size):
    assert parse_lr_size(text) == size


@pytest.mark.parametrize("text", ["48x", "x48", "0x4", "-3x4", "4x4x4", "abc", ""])
def test_parse_lr_size_errors(text):
    with pytest.raises(QnasError, match="lr-size"):
        parse_lr_size(text)
