"""The QuantNAS supernet (qnas.nas.supernet): fused vs naive, joint probabilities, entropy, BitOps and its
penalty, the entropy schedule, ADQ, and genotype -> derived network -> cost consistency."""

import math

import pytest
import torch

from qnas.cost import count_cost
from qnas.errors import QnasError
from qnas.nas.adq import ADQ
from qnas.nas.derive import DerivedNetwork, genotype_cost, uniform_genotype
from qnas.nas.graph import compile_space
from qnas.nas.layers import DerivedLayer
from qnas.nas.regularizers import BitOpsPenalty, BitOpsTarget, entropy_coef
from qnas.nas.supernet import SearchLayer, Supernet
from qnas.spaces import load_space


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny shapes gain nothing from a second thread, and on a shared machine it waits for a core at every
    parallel region."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_space(candidates, channels=6):
    """Head, a residual cell of two layers repeated twice with shared slots, upsampler: every node kind the
    builtin spaces use, at a size that runs in milliseconds."""
    return {
        "name": "tiny",
        "channels": channels,
        "candidates": candidates,
        "cells": {
            "block": [
                {"name": "a", "op": "layer", "out": "c"},
                {"name": "skip", "op": "layer", "inputs": ["input"], "out": "c", "candidates": ["conv1x1"]},
                {"name": "b", "op": "layer", "inputs": ["a"], "out": "c"},
                {"name": "sum", "op": "add", "inputs": ["b", "skip"]},
            ]
        },
        "network": [
            {"name": "head", "op": "layer", "out": "c"},
            {"name": "body", "op": "residual", "cell": "block", "repeat": 2, "alphas": "block"},
            {"name": "up", "op": "layer", "out": "colors*scale*scale"},
            {"name": "ps", "op": "pixel_shuffle"},
        ],
    }


MIXED = ["conv1x1", "conv3x3", "conv3x1_1x3", "conv5x5", "conv5x1_1x5", "conv3x3_g3"]


def _pair(candidates, mode="quant", bits=(6, 8), tie=True, seed=0):
    torch.manual_seed(seed)
    c = compile_space(load_space(tiny_space(candidates)), 2)
    fused = Supernet(c, w_bits=list(bits), tie_bits=tie, mode=mode, impl="fused")
    with torch.no_grad():
        for a in fused.alphas.values():
            a.normal_()
        # Non-zero biases: with zero ones a layer's output is exactly 0 wherever its quantized input is,
        # and relu's gradient at exactly 0 then depends on the last ulp of two exact summation orders.
        for name, p in fused.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    naive = Supernet(c, w_bits=list(bits), tie_bits=tie, mode=mode, impl="naive")
    naive.load_state_dict(fused.state_dict())
    return fused, naive


@pytest.mark.parametrize("candidates", [MIXED, ["conv3x1_1x3", "conv5x1_1x5"], ["conv3x3", "growth2_3x3"]])
@pytest.mark.parametrize("tie", [True, False])
def test_fused_equals_naive(candidates, tie):
    """The whole supernet gives the same output, and every layer, fed the input and output gradient it
    sees inside the network, the same output and gradients (input, probabilities, every parameter).

    Gradients are compared layer by layer because quantization makes the network's gradient piecewise:
    relu at 0 and the LSQ clamp at qmax + 1/2 are continuous in the forward but jump in the backward, so
    an ulp of difference between two exact summation orders upstream can move one element across such a
    point and change a gradient downstream by a whole term. Inside one layer both see the same input."""
    fused, naive = _pair(candidates, tie=tie)
    x = torch.rand(2, 3, 10, 10)
    torch.testing.assert_close(fused(x), naive(x), rtol=1e-4, atol=1e-6)

    seen = {}

    def capture(name):
        def hook(mod, args, out):
            seen[name] = (args[0].detach(), args[1][mod.slot].detach())
            out.register_hook(lambda g: seen.__setitem__(name, (*seen[name][:2], g.detach())))

        return hook

    layers = {n: m for n, m in fused.named_modules() if isinstance(m, SearchLayer)}
    handles = [m.register_forward_hook(capture(n)) for n, m in layers.items()]
    y = fused(x)
    y.backward(torch.randn_like(y))
    for h in handles:
        h.remove()
    twins = dict(naive.named_modules())
    for name, layer in layers.items():
        xin, probs, gout = seen[name]
        # The same state: both networks set their LSQ steps from the activations they saw, which agree
        # only to an ulp, and an ulp moves weights that sit on a rounding boundary to another level.
        twins[name].load_state_dict(layer.state_dict())
        results = []
        for mod in (layer, twins[name]):
            mod.zero_grad(set_to_none=True)
            xi, pi = xin.clone().requires_grad_(), probs.clone().requires_grad_()
            out = mod(xi, {mod.slot: pi})
            out.backward(gout)
            # Entries outside the tied bits have probability 0 in the supernet (the softmax masks them);
            # only the allowed ones have a gradient that means anything.
            grads = {"input": xi.grad, "probs": pi.grad * fused.allowed(mod.slot)}
            grads.update({k: p.grad for k, p in mod.named_parameters()})
            results.append((out, grads))
        (out_f, g_f), (out_n, g_n) = results
        torch.testing.assert_close(out_f, out_n, rtol=1e-4, atol=1e-6, msg=name)
        for k, gn in g_n.items():
            gf = g_f[k]
            if gn is None:
                assert gf is None or not gf.any(), (name, k)
                continue
            err = (gf - gn).abs().max() / gn.abs().max().clamp_min(1e-12)
            assert err < 2e-3, (name, k, float(err))


def test_fused_equals_naive_channels_last():
    fused, naive = _pair(MIXED)
    x = torch.rand(2, 3, 10, 10).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(
        fused.to(memory_format=torch.channels_last)(x), naive(x.contiguous()), rtol=1e-4, atol=1e-6
    )


def test_noise_mode_runs_and_is_seeded_by_torch():
    fused, naive = _pair(MIXED, mode="noise")
    x = torch.rand(2, 3, 10, 10)
    torch.manual_seed(3)
    a = fused(x)
    torch.manual_seed(3)
    b = fused(x)
    torch.manual_seed(4)
    c = fused(x)
    assert torch.equal(a, b) and not torch.equal(a, c)
    (a.square().mean()).backward()
    assert all(p.grad is not None for p in fused.alpha_parameters())


@pytest.mark.parametrize("seed", [0, 1])
def test_noise_mode_has_the_same_distribution_as_the_naive_loop(seed):
    """The fused noise (Philox streams, one range per tensor) and the naive loop's torch.randn noise of the
    QuantNAS code draw the same noise: the spread between two draws of the whole network's output (every
    layer's weight and activation noise, propagated) agrees within 15% (measured: within 4%), is centred,
    and is far from zero. A noise of the wrong size (e.g. the range of 2^b levels, or no /2) fails."""
    fused, naive = _pair(MIXED, mode="noise", seed=seed)
    x = torch.rand(2, 3, 10, 10)

    def spread(net):
        torch.manual_seed(1)
        with torch.no_grad():
            return torch.cat([(net(x) - net(x)).flatten() for _ in range(4)])

    df, dn = spread(fused), spread(naive)
    assert 0.85 < float(df.std() / dn.std()) < 1.15
    assert abs(float(df.mean())) < 0.1 * float(df.std()) and abs(float(dn.mean())) < 0.1 * float(dn.std())
    assert float(df.std()) > 1e-3


def test_probs_joint_softmax_and_tied_bits():
    net = Supernet(compile_space(load_space(tiny_space(MIXED)), 2), w_bits=[4, 8], mode="quant")
    probs = net.probs()
    assert set(probs) == {"head", "block.a", "block.skip", "block.b", "up"}
    p = probs["head"]
    assert p.shape == (len(MIXED), 2, 2)
    assert torch.allclose(p.sum(), torch.tensor(1.0))
    assert (p[:, 0, 1] == 0).all() and (p[:, 1, 0] == 0).all()  # w4a8 / w8a4 are not candidates
    untied = Supernet(net.compiled, w_bits=[4, 8], tie_bits=False, mode="quant").probs()["head"]
    assert (untied > 0).all()


def test_entropy_of_uniform_alphas():
    net = Supernet(compile_space(load_space(tiny_space(MIXED)), 2), w_bits=[4, 8], mode="quant")
    with torch.no_grad():
        for a in net.alphas.values():
            a.zero_()
    h = float(net.entropy(net.probs()).detach())
    # 4 slots with 6 ops x 2 tied bits = 12 choices, the skip slot 1 op x 2 bits.
    assert h == pytest.approx(4 * math.log(12) + math.log(2), rel=1e-6)


def test_expected_bitops_of_a_one_hot_supernet_equals_the_derived_network_cost():
    space = load_space(tiny_space(MIXED))
    net = Supernet(compile_space(space, 2), w_bits=[4, 8], mode="quant")
    g = uniform_genotype(space, 2, "conv3x1_1x3", 4)
    g["layers"]["block.a"] = {"op": "conv5x5", "w_bits": 8, "a_bits": 8}
    g["layers"]["up"] = {"op": "conv3x3_g3", "w_bits": 8, "a_bits": 8}
    probs = {}
    for slot, cands in net.compiled.slots.items():
        ch = g["layers"][slot]
        p = torch.zeros(len(cands), 2, 2)
        p[cands.index(ch["op"]), [4, 8].index(ch["w_bits"]), [4, 8].index(ch["a_bits"])] = 1
        probs[slot] = p
    expected = float(net.expected_bitops_per_pixel(probs)) * 20 * 30
    assert expected == genotype_cost(g, (20, 30))["bitops"]
    # ... and qnas.cost on the network itself agrees (a real forward on CPU, not only the meta device).
    assert count_cost(DerivedNetwork(g, "lsq"), (20, 30)).bitops == expected


def test_penalty_is_normalized_by_the_initial_expected_bitops():
    net = Supernet(compile_space(load_space(tiny_space(MIXED)), 2), mode="quant")
    e0 = float(net.expected_bitops_per_pixel(net.probs()))
    pen = BitOpsPenalty(0.3, e0)
    assert float(pen(net.expected_bitops_per_pixel(net.probs()))) == pytest.approx(0.3)
    with torch.no_grad():  # all mass on the cheapest term of every slot: the ratio drops below 1
        for slot in net.slots:
            a = net.alphas[slot.replace(".", "-")]
            a.fill_(-30)
            a[0, 0, 0] = 30  # conv1x1 (first candidate) at 6 bits
    assert float(pen.normalized(net.expected_bitops_per_pixel(net.probs()))) < 0.2
    with pytest.raises(ValueError):
        BitOpsPenalty(1.0, 0.0)


def test_penalty_gradient_prefers_cheap_ops():
    net = Supernet(compile_space(load_space(tiny_space(MIXED)), 2), w_bits=[4, 8], mode="quant")
    e = net.expected_bitops_per_pixel(net.probs())
    e.backward()
    g = net.alphas["head"].grad
    assert g[MIXED.index("conv1x1"), 0, 0] < g[MIXED.index("conv5x5"), 1, 1]


def test_entropy_schedule():
    steps, coef = 100, 1e-2
    w = [entropy_coef(t, steps, coef, 0.25) for t in range(steps)]
    assert w[:25] == [0.0] * 25
    assert w[-1] == pytest.approx(coef)
    assert all(b >= a for a, b in zip(w, w[1:], strict=False))  # never decreases
    assert 0 < w[60] < coef
    assert entropy_coef(50, 100, 0.0, 0.25) == 0.0
    assert entropy_coef(0, 10, coef, 0.0) == 0.0 and entropy_coef(9, 10, coef, 0.0) == pytest.approx(coef)


def test_adq_formula_and_ablation():
    torch.manual_seed(0)
    adq = ADQ(4)
    x = torch.randn(3, 4, 5, 5) * 2
    f = lambda t: 0.5 * t  # noqa: E731
    sigma = x.std(dim=(1, 2, 3), keepdim=True)
    expected = f(adq.bn(x)) * (1.5 * sigma + 0.0) + x
    torch.testing.assert_close(adq(x, f), expected)
    assert float(adq.w) == 1.5 and float(adq.b) == 0.0
    no_adq = Supernet(compile_space(load_space(tiny_space(["conv3x3"])), 2), mode="quant", adq=False)
    assert not any(isinstance(m, ADQ) for m in no_adq.modules())
    assert any(isinstance(m, ADQ) for m in Supernet(no_adq.compiled, mode="quant").modules())


def test_choices_within_a_budget_are_the_most_probable_genotype_that_fits():
    """Supernet.choices(budget): the genotype with the largest Σ log p whose BitOps are at most the budget,
    checked against brute force over every genotype of a small space; no budget: the argmax; a budget
    below every genotype: the cheapest."""
    import itertools

    space = load_space(tiny_space(["conv1x1", "conv3x3", "conv5x5"]))
    torch.manual_seed(3)
    net = Supernet(compile_space(space, 2), w_bits=[4, 8], mode="quant")
    with torch.no_grad():
        for a in net.alphas.values():
            a.normal_(0, 2)
    probs = {s: p.double().flatten() for s, p in net.probs().items()}
    costs = {s: getattr(net, f"bitops_{s.replace('.', '-')}").flatten() for s in net.slots}
    entries = {s: net.allowed(s).flatten().nonzero().flatten().tolist() for s in net.slots}

    def flat_of(slot, ch):
        o = net.compiled.slots[slot].index(ch["op"])
        return (o * 2 + [4, 8].index(ch["w_bits"])) * 2 + [4, 8].index(ch["a_bits"])

    argmax = net.choices()
    assert all(flat_of(s, c) == int(probs[s].argmax()) for s, c in argmax.items())
    total = lambda pick: sum(float(costs[s][e]) for s, e in pick.items())  # noqa: E731
    everything = [dict(zip(net.slots, combo, strict=True)) for combo in itertools.product(*entries.values())]
    lo, hi = min(map(total, everything)), total({s: flat_of(s, c) for s, c in argmax.items()})
    for budget in (lo * 1.2, (lo + hi) / 2, hi * 0.9):
        fits = [g for g in everything if total(g) <= budget]
        best = max(fits, key=lambda g: sum(float(probs[s][e].log()) for s, e in g.items()))
        got = {s: flat_of(s, c) for s, c in net.choices(budget).items()}
        assert total(got) <= budget
        # Brute force (the grid rounds costs up by at most budget/4096 per slot: no tie at these budgets).
        logp = lambda g: sum(float(probs[s][e].log()) for s, e in g.items())  # noqa: E731
        assert got == best, (budget, logp(got), logp(best))
    cheapest = {s: flat_of(s, c) for s, c in net.choices(lo / 2).items()}
    assert total(cheapest) == lo


def test_genotype_choice_is_the_argmax():
    net = Supernet(compile_space(load_space(tiny_space(MIXED)), 2), w_bits=[4, 8], mode="quant")
    with torch.no_grad():
        net.alphas["head"][MIXED.index("conv5x1_1x5"), 1, 1] = 5.0
    ch = net.choices()["head"]
    assert (ch["op"], ch["w_bits"], ch["a_bits"]) == ("conv5x1_1x5", 8, 8) and ch["prob"] > 0.9


def test_search_layer_state_round_trip():
    fused, _ = _pair(MIXED)
    fused(torch.rand(1, 3, 8, 8))  # LSQ steps initialised from data
    again = Supernet(fused.compiled, w_bits=[6, 8], mode="quant")
    again.load_state_dict(fused.state_dict())
    layers = [m for m in again.modules() if isinstance(m, SearchLayer)]
    assert layers and all(m._initialized for m in layers)


def test_anchor_skip_adds_the_nearest_upsampled_input_in_supernet_and_derived_network():
    """The anchor is in GraphModule: with the same weights, a space with "anchor": "nearest" outputs the
    space without it plus the input with every pixel repeated scale x scale times, in the supernet and in
    the derived network (both are built from the same compiled graph)."""
    paper = load_space({**tiny_space(MIXED), "anchor": None})
    anchored = load_space({**tiny_space(MIXED), "anchor": "nearest"})
    x = torch.rand(2, 3, 5, 7)
    up = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    a = Supernet(compile_space(anchored, 2), mode="quant").eval()
    p = Supernet(compile_space(paper, 2), mode="quant").eval()
    p.load_state_dict(a.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(a(x), p(x) + up)
    g = uniform_genotype(anchored, 2, "conv3x3", 4)
    da, dp = DerivedNetwork(g, "lsq").eval(), DerivedNetwork({**g, "space": paper}, "lsq").eval()
    dp.load_state_dict(da.state_dict())
    with torch.no_grad():
        # The derived network is fully quantized: the anchor is added before its output quantizer.
        torch.testing.assert_close(da(x), da.output_quant(dp.net(x) + up))
        assert not torch.equal(da(x), dp(x) + up)
    # 0 BitOps: the cost of the network does not change.
    assert genotype_cost(g, (8, 8)) == genotype_cost({**g, "space": paper}, (8, 8))


def _std_ratio(w: torch.Tensor, gain: float) -> float:
    fan_in = w[0].numel()
    return float(w.std()) / (gain / math.sqrt(fan_in))


def test_every_candidate_starts_variance_preserving_and_derived_convs_keep_the_default():
    """He init (gain sqrt(2) after a relu, 1 for signed inputs), not nn.Conv2d's default (a = sqrt(5): a
    standard deviation sqrt(6) times smaller), in the supernet's candidates, where the rescaled mixture
    needs it. Derived networks keep nn.Conv2d's default (He init makes their nested residuals explode)."""
    space = tiny_space(MIXED, channels=12)
    space["network"][0]["act"] = "none"  # the head reads signed input: gain 1
    torch.manual_seed(0)
    net = Supernet(compile_space(load_space(space), 2), mode="quant", init="he")
    for name, p in net.named_parameters():
        if p.dim() == 4:
            first_stage = ".weights." in name and ("composites" not in name or name.endswith("weights.0"))
            gain = 1.0 if name.startswith("net.nodes.head.") and first_stage else math.sqrt(2)
            assert 0.85 < _std_ratio(p, gain) < 1.15, name
    derived = DerivedNetwork(uniform_genotype(load_space(space), 2, "conv3x1_1x3", 4))
    convs = [c for m in derived.modules() if isinstance(m, DerivedLayer) for c in m.convs]
    assert convs
    for conv in convs:
        # kaiming_uniform(a=sqrt(5)): std = 1 / sqrt(3 fan_in), i.e. gain 1/sqrt(3).
        assert 0.75 < _std_ratio(conv.weight, 1 / math.sqrt(3)) < 1.25


def test_the_supernet_starts_at_its_anchor_skip_and_he_init_restores_the_variance_preserving_start():
    """init "anchor" (default): every ADQ gain is 0 and the last layer's kernels are He's times 0.1, so the
    untrained supernet outputs about its anchor (basic space, x4: the output's deviation from the nearest-
    upsampled input is ~0.05 against ~18 with init "he", which drove the ReLU in front of the upsampler to
    death in the first weight steps). Same random draws: the two inits differ only in those tensors."""
    space = load_space("basic")
    x = torch.rand(2, 3, 12, 12)
    up = x.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)
    nets = {}
    for init in ("anchor", "he"):
        torch.manual_seed(0)
        nets[init] = Supernet(compile_space(space, 4), mode="noise", init=init).eval()
    with torch.no_grad():
        dev = {k: float((n(x) - up).abs().mean()) for k, n in nets.items()}
    assert dev["anchor"] < 0.15 < 3.0 < dev["he"], dev
    a, h = nets["anchor"].state_dict(), nets["he"].state_dict()
    differ = {k for k in a if a[k].is_floating_point() and not torch.equal(a[k], h[k])}
    assert differ and all(k.endswith("adq.w") or k.startswith("net.nodes.upsample.") for k in differ)
    assert all(float(a[k]) == 0 for k in differ if k.endswith("adq.w"))
    w = "net.nodes.upsample.weights.0"
    torch.testing.assert_close(a[w], h[w] * Supernet.OUTPUT_LAYER_GAIN)
    with pytest.raises(QnasError, match="--supernet-init"):
        Supernet(compile_space(space, 4), init="zero")


def test_rescaled_mixture_keeps_the_variance_and_is_exact_at_one_hot():
    net = Supernet(compile_space(load_space(tiny_space(MIXED)), 2), w_bits=[4, 8], mode="quant")
    with torch.no_grad():
        for a in net.alphas.values():
            a.zero_()
    uniform = net.probs()
    mixed = net.mixing_weights(uniform)
    # Six ops with two tied bit-widths each: P_o = 1/6, the gain is sqrt(6).
    torch.testing.assert_close(mixed["head"], uniform["head"] * math.sqrt(len(MIXED)))
    one_hot = {s: torch.zeros_like(p) for s, p in uniform.items()}
    for p in one_hot.values():
        p.view(-1)[0] = 1
    assert all(torch.equal(net.mixing_weights(one_hot)[s], one_hot[s]) for s in one_hot)
    assert net.mixing_weights(uniform) is not uniform
    plain = Supernet(net.compiled, w_bits=[4, 8], mode="quant", mix_norm="none")
    assert plain.mixing_weights(uniform) is uniform


@pytest.mark.parametrize("mix_norm, keeps", [("rescale", True), ("none", False)])
def test_a_chain_of_mixed_layers_keeps_its_signal_only_when_rescaled(mix_norm, keeps):
    """Chained searched layers at uniform probabilities: with the rescaled mixture every layer's output has
    about the standard deviation of its input; the plain DARTS sum loses about sqrt(6) per layer
    (measured: 0.91 and 0.062 over three layers)."""
    chain = {
        "name": "chain",
        "channels": 24,
        "candidates": MIXED,
        "network": [
            *({"name": f"l{k}", "op": "layer", "out": "c", "act": "none"} for k in range(4)),
            {"name": "up", "op": "layer", "out": "colors*scale*scale"},
            {"name": "ps", "op": "pixel_shuffle"},
        ],
    }
    torch.manual_seed(0)
    net = Supernet(compile_space(load_space(chain), 2), w_bits=[8], mode="quant", mix_norm=mix_norm)
    with torch.no_grad():
        for a in net.alphas.values():
            a.zero_()
    stds = {}
    for name, m in net.named_modules():
        if isinstance(m, SearchLayer):
            m.register_forward_hook(lambda mod, a, out, n=name: stds.__setitem__(n.split(".")[-1], out.std()))
    with torch.no_grad():
        net(torch.randn(2, 3, 16, 16))
    ratio = float(stds["l3"] / stds["l0"])  # three mixed layers apart: plain sum about (1/sqrt(6))^3
    assert (0.5 < ratio < 2.0) if keeps else ratio < 0.15


def test_bitops_target_is_symmetric_in_the_ratio_and_pulls_towards_the_target():
    t = BitOpsTarget(0.5, 100.0)
    assert float(t(torch.tensor(100.0))) == 0.0
    assert float(t(torch.tensor(200.0))) == pytest.approx(float(t(torch.tensor(50.0))))
    assert float(t(torch.tensor(200.0))) == pytest.approx(0.5 * math.log(2) ** 2)
    net = Supernet(compile_space(load_space(tiny_space(MIXED)), 2), w_bits=[4, 8], mode="quant")
    e0 = float(net.expected_bitops_per_pixel(net.probs()))
    for target, cheaper in ((e0 / 3, True), (e0 * 3, False)):
        net.zero_grad()
        BitOpsTarget(1.0, target)(net.expected_bitops_per_pixel(net.probs())).backward()
        g = net.alpha("head").grad
        # Gradient descent raises the logits with the more negative gradient.
        prefers_cheap = g[MIXED.index("conv1x1"), 0, 0] < g[MIXED.index("conv5x5"), 1, 1]
        assert prefers_cheap == cheaper
    with pytest.raises(ValueError):
        BitOpsTarget(1.0, 0.0)


@pytest.mark.parametrize("tie", [True, False])
def test_a_single_path_computes_what_the_mixture_computes_at_one_hot(tie):
    """Supernet.forward_path (single-path search) runs only the chosen candidate of every slot, with the
    same quantizers, steps and bias as the mixture at that one-hot probability: outputs and gradients agree."""
    fused, _ = _pair(MIXED, tie=tie)
    x = torch.rand(2, 3, 9, 11)
    fused(x)  # LSQ's data-driven step init, as in a search
    gen = torch.Generator().manual_seed(3)
    for _ in range(4):
        path = fused.sample_path(gen)
        probs = {}
        for slot, e in path.items():
            assert fused.allowed(slot).flatten()[e]
            p = torch.zeros(fused.alpha(slot).numel())
            p[e] = 1
            probs[slot] = p.view_as(fused.alpha(slot))
        params = fused.weight_parameters()
        a = fused(x, probs)
        ga = torch.autograd.grad(a.square().sum(), params, allow_unused=True)
        b = fused.forward_path(x, path)
        gb = torch.autograd.grad(b.square().sum(), params, allow_unused=True)
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
        names = [n for n, p in fused.named_parameters() if not n.startswith("alphas.")]
        for name, u, v in zip(names, ga, gb, strict=True):
            if v is None:  # candidates off the path: no gradient, and zero through the mixture
                assert u is None or not u.any(), name
            else:
                # Scalars such as ADQ's gain sum the whole output: float summation order (one fused
                # convolution against one plain one) shows at 1e-4 relative.
                torch.testing.assert_close(v, u, atol=1e-4, rtol=2e-3, msg=name)


def test_best_within_maximizes_the_total_score_under_the_budget():
    net = Supernet(compile_space(load_space(tiny_space(["conv1x1", "conv3x3"])), 2), w_bits=[4, 8])
    costs = {s: getattr(net, f"bitops_{s.replace('.', '-')}").flatten() for s in net.slots}
    gen = torch.Generator().manual_seed(0)
    scores = {s: torch.randn(c.numel(), generator=gen, dtype=torch.float64) for s, c in costs.items()}
    entries = {s: net.allowed(s).flatten().nonzero().flatten().tolist() for s in net.slots}
    import itertools

    combos = list(itertools.product(*(entries[s] for s in net.slots)))
    total_cost = [sum(float(costs[s][e]) for s, e in zip(net.slots, c, strict=True)) for c in combos]
    levels = sorted(set(total_cost))
    k = len(levels) // 2
    budget = (levels[k] + levels[k + 1]) / 2  # between two genotypes' costs: no rounding at the boundary
    best = max(
        (c for c, t in zip(combos, total_cost, strict=True) if t <= budget),
        key=lambda c: sum(float(scores[s][e]) for s, e in zip(net.slots, c, strict=True)),
    )
    picks = net.best_within(scores, budget)
    assert tuple(picks[s] for s in net.slots) == best


def test_lsq_steps_are_learned_in_the_log_domain():
    """The supernet's LSQ steps (weights, inputs, between composite stages) are exp of learned log-steps:
    an Adam update moves a step by a fraction of itself and never through zero (a linearly learned
    small step crossed zero and silenced whole layers); checkpoints holding the steps themselves load."""
    net = Supernet(compile_space(load_space(tiny_space(MIXED)), 2), w_bits=[2, 4], mode="quant")
    x = torch.rand(2, 3, 8, 8)
    net(x)  # LSQ's data-driven init on the first batch
    layer = net.net.nodes["head"]
    before = layer.a_scales.detach().clone()
    assert (before > 0).all() and (layer.w_scales > 0).all()
    logs = [p for n, p in net.named_parameters() if "log_" in n]
    assert logs and all("log_" in n for n, _ in net.named_parameters() if n.endswith("scales"))
    opt = torch.optim.Adam(logs, lr=1e-3)
    for _ in range(20):
        opt.zero_grad()
        net(x).square().mean().backward()  # pushes every step down
        opt.step()
    ratio = layer.a_scales.detach() / before
    assert ((ratio > 0.95) & (ratio < 1.05)).all()
    state = {k: v for k, v in net.state_dict().items()}
    legacy = {k.replace("log_", ""): (v.exp() if "log_" in k else v) for k, v in state.items()}
    again = Supernet(net.compiled, w_bits=[2, 4], mode="quant")
    again.load_state_dict(legacy)
    for k, v in again.state_dict().items():
        assert torch.allclose(v, state[k], atol=1e-6), k
