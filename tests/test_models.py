"""qnas.sr: shapes, parameter counts against the papers, registry/config, hooks, SRGAN pieces."""

import json

import pytest
import torch
from torch import nn

import qnas.sr as sr
from qnas.errors import CheckpointError, QnasError
from qnas.sr.srgan import VGG19_CFG, VGG19_LAYERS


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def build_meta(name: str, scale: int, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return sr.build_model(name, scale, **kwargs)


# ---------------------------------------------------------------------------------------------
# Shapes: every model x scale; the 43M-parameter EDSR runs on the meta device (shapes only).
@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize("name", sr.list_models())
def test_output_shape(name, scale):
    h, w = 15, 17  # non-square, and the smallest size ESA (rfdn) accepts
    if name == "edsr":
        model = build_meta(name, scale)
        x = torch.zeros(1, 3, h, w, device="meta")
    else:
        torch.manual_seed(0)
        model = sr.build_model(name, scale).eval()
        x = torch.rand(1, 3, h, w)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (1, 3, h * scale, w * scale)
    if x.device.type == "cpu":
        assert torch.isfinite(y).all()


def test_list_models_and_registry():
    assert sr.list_models() == sorted(sr.MODELS)
    assert {"edsr", "edsr-baseline", "srresnet", "rfdn"} <= set(sr.list_models())
    for spec in sr.MODELS.values():
        json.dumps(spec.arguments())  # every preset is JSON


# ---------------------------------------------------------------------------------------------
# Parameter counts.
def edsr_params(scale: int, blocks: int, c: int) -> int:
    conv = lambda cin, cout: cin * cout * 9 + cout  # noqa: E731  3x3 conv with bias
    up = {2: conv(c, 4 * c), 3: conv(c, 9 * c), 4: 2 * conv(c, 4 * c)}[scale]
    return conv(3, c) + blocks * 2 * conv(c, c) + conv(c, c) + up + conv(c, 3)


def test_edsr_baseline_x4_has_exactly_1517571_parameters():
    assert n_params(sr.build_model("edsr-baseline", 4)) == 1_517_571
    assert edsr_params(4, 16, 64) == 1_517_571


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_edsr_parameter_counts(scale):
    assert n_params(build_meta("edsr-baseline", scale)) == edsr_params(scale, 16, 64)
    assert n_params(build_meta("edsr", scale)) == edsr_params(scale, 32, 256)


def test_edsr_matches_the_paper():
    # Lim et al. 2017: EDSR 43M parameters (x4; 40.7M at x2 where the upsampler is one stage).
    assert round(n_params(build_meta("edsr", 2)) / 1e6, 1) == 40.7
    assert round(n_params(build_meta("edsr", 4)) / 1e6, 1) == 43.1
    assert round(n_params(build_meta("edsr-baseline", 4)) / 1e6, 1) == 1.5


def test_srresnet_parameter_count():
    c = 64
    conv3 = c * c * 9  # no bias: BN follows
    head = 3 * c * 81 + c + 1  # 9x9 conv + PReLU
    blocks = 16 * (2 * conv3 + 2 * 2 * c + 1)  # 2 convs, 2 BN, 1 PReLU
    post = conv3 + 2 * c
    up = 2 * (c * 4 * c * 9 + 4 * c + 1)
    tail = c * 3 * 81 + 3
    expected = head + blocks + post + up + tail
    assert n_params(sr.build_model("srresnet", 4)) == expected == 1_547_350  # "1.5M" in SR tables
    no_bn = sr.build_model("srresnet", 4, bn=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in no_bn.modules())
    assert all(m.bias is not None for m in no_bn.modules() if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize(
    "name, counts",
    [
        ("rfdn", {2: 417_212, 3: 423_977, 4: 433_448}),  # reference code; AIM 2020: 0.433M at x4
        ("rfdn-paper", {2: 534_036, 3: 540_531, 4: 549_624}),  # paper: 534K / 541K / 550K
        ("rfdn-l", {2: 625_962, 3: 632_997, 4: 642_846}),  # paper: 626K / 633K / 643K
    ],
)
def test_rfdn_parameter_counts(name, counts):
    for scale, count in counts.items():
        assert n_params(sr.build_model(name, scale)) == count


def test_rfdn_nf_is_configurable():
    m = sr.build_model("rfdn", 2, nf=32, n_blocks=2)
    assert m.fea_conv.out_channels == 32 and not hasattr(m, "B3")
    assert m(torch.rand(1, 3, 16, 16)).shape == (1, 3, 32, 32)


# ---------------------------------------------------------------------------------------------
# Building blocks.
def test_mean_shift_is_a_buffer_scaled_by_rgb_range():
    m = sr.build_model("edsr-baseline", 2)
    assert not any("mean" in k for k in m.state_dict())  # fixed op: not learned, not stored
    shift = sr.MeanShift(rgb_range=255, sign=-1)
    x = torch.zeros(1, 3, 2, 2)
    assert torch.allclose(shift(x)[0, :, 0, 0], -255 * torch.tensor(sr.DIV2K_RGB_MEAN))
    back = sr.MeanShift(rgb_range=255, sign=1)
    x = torch.rand(1, 3, 4, 4)
    assert torch.allclose(back(shift(x)), x, atol=1e-5)


def test_edsr_forward_matches_the_definition():
    torch.manual_seed(0)
    m = sr.build_model("edsr-baseline", 2, n_resblocks=2, n_feats=8, res_scale=0.1).eval()
    x = torch.rand(1, 3, 6, 5)
    mean = torch.tensor(sr.DIV2K_RGB_MEAN).view(1, 3, 1, 1)
    h = m.head[0](x - mean)
    r = h
    for blk in m.body[:2]:
        conv1, conv2 = blk.body[0], blk.body[2]
        r = r + 0.1 * conv2(torch.relu(conv1(r)))
    r = m.body[2](r) + h
    up = nn.functional.pixel_shuffle(m.tail[0][0](r), 2)
    expected = m.tail[1](up) + mean
    assert torch.allclose(m(x), expected, atol=1e-6)


class MarkedConv(nn.Conv2d):
    """A stand-in for a quantized convolution built through the `conv` hook."""

    w_bits = 4
    a_bits = 8


def marked_conv(cin, cout, k, *, stride=1, padding=None, groups=1, bias=True):
    return MarkedConv(
        cin, cout, k, stride=stride, padding=k // 2 if padding is None else padding, groups=groups, bias=bias
    )


class CountingAdd(sr.Add):
    pass


@pytest.mark.parametrize("name, n_adds", [("edsr-baseline", 17), ("srresnet", 17), ("rfdn", 4 * 4 + 1)])
def test_hooks_replace_every_conv_and_skip(name, n_adds):
    m = sr.build_model(name, 2, conv=marked_conv, add=CountingAdd)
    convs = [mod for mod in m.modules() if isinstance(mod, nn.Conv2d)]
    assert convs and all(type(c) is MarkedConv for c in convs)
    assert sum(isinstance(mod, CountingAdd) for mod in m.modules()) == n_adds
    assert not any(type(mod) is sr.Add for mod in m.modules())
    assert m(torch.rand(1, 3, 16, 16)).shape == (1, 3, 32, 32)
    assert "conv" not in sr.model_config(m)["kwargs"]  # hooks are not part of the config


# ---------------------------------------------------------------------------------------------
# Registry errors and configs.
def test_unknown_model_lists_known_names():
    with pytest.raises(QnasError, match=r"unknown model 'nope' \(known: edsr, edsr-baseline"):
        sr.build_model("nope", 2)


@pytest.mark.parametrize("scale", [1, 5, 8, "4", 4.0, True])
def test_bad_scale_names_the_value(scale):
    with pytest.raises(QnasError, match=f"scale {scale!r} is not supported"):
        sr.build_model("edsr-baseline", scale)


def test_bad_kwargs():
    with pytest.raises(QnasError, match="unknown argument 'blocks'"):
        sr.build_model("edsr-baseline", 2, blocks=3)
    with pytest.raises(QnasError, match="n_resblocks"):
        sr.build_model("edsr-baseline", 2, n_resblocks="16")
    with pytest.raises(QnasError, match="n_feats must be a positive integer"):
        sr.build_model("edsr-baseline", 2, n_feats=0)
    with pytest.raises(QnasError, match="attention"):
        sr.build_model("rfdn", 2, attention="cbam")


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("edsr-baseline", {"n_resblocks": 2, "n_feats": 16, "res_scale": 0.5}),
        ("srresnet", {"n_blocks": 2, "bn": False}),
        ("rfdn", {"nf": 24, "n_blocks": 2}),
        ("rfdn-paper", {}),
    ],
)
def test_config_round_trip_rebuilds_an_identical_model(name, kwargs):
    torch.manual_seed(0)
    a = sr.build_model(name, 3, **kwargs).eval()
    cfg = json.loads(json.dumps(sr.model_config(a)))
    assert cfg["name"] == name and cfg["scale"] == 3
    b = sr.build_from_config(cfg).eval()
    assert sr.model_config(b) == cfg
    assert [(k, v.shape) for k, v in a.state_dict().items()] == [
        (k, v.shape) for k, v in b.state_dict().items()
    ]
    b.load_state_dict(a.state_dict())
    x = torch.rand(1, 3, 16, 16)
    assert torch.equal(a(x), b(x))


def test_build_from_config_accepts_model_alias_and_rejects_bad_configs():
    m = sr.build_from_config({"model": "edsr-baseline", "scale": 2, "kwargs": {"n_resblocks": 1}})
    assert sr.model_config(m)["kwargs"]["n_resblocks"] == 1
    for bad, msg in [
        ([1, 2], "must be a JSON object"),
        ({"scale": 2}, 'needs "name"'),
        ({"name": "edsr"}, 'has no "scale"'),
        ({"name": "edsr", "scale": 2, "kwargs": [1]}, '"kwargs" must be a JSON object'),
    ]:
        with pytest.raises(QnasError, match=msg):
            sr.build_from_config(bad)
    with pytest.raises(QnasError, match="not built by qnas.sr.build_model"):
        sr.model_config(nn.Conv2d(1, 1, 1))


# ---------------------------------------------------------------------------------------------
# SRGAN pieces.
def test_discriminator_shapes_and_input_check():
    d = sr.SRGANDiscriminator()  # the paper's 96x96 HR patches
    assert d(torch.rand(2, 3, 96, 96)).shape == (2, 1)
    small = sr.SRGANDiscriminator(input_size=32, base_channels=8)
    assert small(torch.rand(3, 3, 32, 32)).shape == (3, 1)
    with pytest.raises(QnasError, match=r"expected \[N, 3, 32, 32\]"):
        small(torch.rand(1, 3, 48, 48))
    with pytest.raises(QnasError, match="multiple of 16"):
        sr.SRGANDiscriminator(input_size=40)
    strides = [m.stride[0] for m in d.features if isinstance(m, nn.Conv2d)]
    assert strides == [1, 2, 1, 2, 1, 2, 1, 2]


def test_adversarial_losses():
    real, fake = torch.tensor([[2.0], [0.5]]), torch.tensor([[-1.0], [0.3]])
    expected_d = -(torch.log(torch.sigmoid(real)).mean() + torch.log(1 - torch.sigmoid(fake)).mean())
    assert torch.allclose(sr.discriminator_loss(real, fake), expected_d)
    assert torch.allclose(sr.adversarial_loss(fake), -torch.log(torch.sigmoid(fake)).mean())
    loss = sr.GeneratorLoss()  # no VGG file: pixel MSE content (SRGAN-MSE)
    srimg, hr = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    parts = loss(srimg, hr, fake)
    assert loss.content == "mse"
    assert torch.allclose(parts["total"], ((srimg - hr) ** 2).mean() + 1e-3 * sr.adversarial_loss(fake))


def random_vgg19_state_dict(layers: int | None = None) -> dict[str, torch.Tensor]:
    """A randomly initialised torchvision-format VGG19 state_dict ("features.N.weight/bias")."""
    g = torch.Generator().manual_seed(0)
    state, idx, cin = {}, 0, 3
    for v in VGG19_CFG:
        if v == "M":
            idx += 1
            continue
        state[f"features.{idx}.weight"] = torch.randn(v, cin, 3, 3, generator=g) * (2 / (9 * cin)) ** 0.5
        state[f"features.{idx}.bias"] = torch.zeros(v)
        idx, cin = idx + 2, v
        if layers is not None and idx > layers:
            break
    return state


def test_vgg_loss_needs_a_weights_file(tmp_path):
    with pytest.raises(QnasError, match="needs a local VGG19 weights file"):
        sr.GeneratorLoss(content="vgg54")
    missing = tmp_path / "vgg19.pth"
    with pytest.raises(CheckpointError, match="vgg19.pth: VGG19 weights file not found"):
        sr.GeneratorLoss(vgg_weights=missing)
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="corrupt.pth: not a readable VGG19 weights file"):
        sr.VGGLoss(corrupt)
    corrupt_st = tmp_path / "corrupt.safetensors"
    corrupt_st.write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="corrupt.safetensors: not a readable safetensors file"):
        sr.VGGLoss(corrupt_st)
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(1)}, wrong)
    with pytest.raises(CheckpointError, match="features.0.weight is missing"):
        sr.VGGLoss(wrong, layer="relu1_2")
    bad_shape = random_vgg19_state_dict(layers=4)
    bad_shape["features.2.weight"] = torch.zeros(64, 3, 3, 3)
    torch.save(bad_shape, wrong)
    with pytest.raises(CheckpointError, match=r"features.2.weight has shape \[64, 3, 3, 3\]"):
        sr.VGGLoss(wrong, layer="relu1_2")
    with pytest.raises(QnasError, match="unknown VGG19 layer"):
        sr.VGGLoss(wrong, layer="relu9_9")


def test_vgg_loss_with_a_local_torchvision_format_file(tmp_path):
    from safetensors.torch import save_file

    state = random_vgg19_state_dict()
    assert state["features.0.weight"].shape == (64, 3, 3, 3)  # torchvision's key layout
    assert state["features.34.weight"].shape == (512, 512, 3, 3) and VGG19_LAYERS["relu5_4"] == 35
    state["classifier.6.bias"] = torch.zeros(1000)  # a full VGG19 file: extra keys are ignored
    path = tmp_path / "vgg19.pth"
    torch.save(state, path)
    loss = sr.GeneratorLoss(vgg_weights=path)
    assert loss.content == "vgg54"
    srimg = torch.rand(1, 3, 32, 32, requires_grad=True)
    hr = torch.rand(1, 3, 32, 32)
    parts = loss(srimg, hr, torch.zeros(1, 1))
    assert torch.isfinite(parts["total"]) and parts["content"] > 0
    parts["total"].backward()
    assert srimg.grad is not None and srimg.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in loss.vgg_loss.parameters())
    assert loss.vgg_loss(hr, hr) == 0

    st_path = tmp_path / "vgg19.safetensors"
    save_file({k: v for k, v in state.items() if k.startswith("features.")}, str(st_path))
    vgg22 = sr.VGGLoss(st_path, layer="relu2_2")
    assert len(vgg22.vgg.features) == VGG19_LAYERS["relu2_2"] + 1
    ref = sr.VGG19Features(path, layer="relu2_2")
    x = torch.rand(1, 3, 16, 16)
    assert torch.equal(vgg22.vgg(x), ref(x))
    ref.train()
    assert not ref.training  # a frozen feature network stays in eval mode


def test_adversarial_step_updates_both_networks():
    torch.manual_seed(0)
    g = sr.build_model("srresnet", 2, n_blocks=1, n_feats=8)
    d = sr.SRGANDiscriminator(input_size=16, base_channels=8)
    g_opt = torch.optim.Adam(g.parameters(), 1e-3)
    d_opt = torch.optim.Adam(d.parameters(), 1e-3)
    g0 = [p.detach().clone() for p in g.parameters()]
    d0 = [p.detach().clone() for p in d.parameters()]
    out = sr.adversarial_step(
        g, d, g_opt, d_opt, torch.rand(2, 3, 8, 8), torch.rand(2, 3, 16, 16), sr.GeneratorLoss()
    )
    assert set(out) == {"d_loss", "g_loss", "content", "adversarial", "d_real", "d_fake"}
    assert all(isinstance(v, float) and v == v for v in out.values())
    assert any(not torch.equal(a, b) for a, b in zip(g0, g.parameters(), strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(d0, d.parameters(), strict=True))
    assert all(p.requires_grad for p in d.parameters())
