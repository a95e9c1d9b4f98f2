"""The QuantNAS supernet: every searched layer mixes all its (op, weight bits, activation bits) candidates
with one joint softmax (Shvetsov et al., "QuantNAS for super resolution: searching for efficient
quantization-friendly architectures against quantization noise", arXiv:2208.14839; the mixing is DARTS',
Liu et al., "DARTS: Differentiable Architecture Search", ICLR 2019).

A layer's candidates are single convolutions, mixed by one call of torch.ops.qops.mixed_quant_conv (all
kernels merged into one convolution), and composites (two convolutions in sequence: 3x1 then 1x3, ...),
which are no single convolution and run beside it in Python, term by term. Both share the layer's input
activation quantizer and its bias, and draw from the same joint probabilities:

    y = sum_{o single} sum_{i,j} p[o,i,j] conv_o(FQa_j(x), FQw_i(W_o))
      + sum_{o composite} sum_{i,j} p[o,i,j] conv_o2(FQa_j(relu(conv_o1(FQa_j(x), FQw_i(W_o1)))), FQw_i(W_o2))
      + bias,      x = relu(input) (activations unsigned; act "none": signed, no relu)

with FQ the LSQ fake quantization (mode "quant") or quantization noise (mode "noise"). Architecture
parameters live in the Supernet, one tensor per slot (layers of cells that share a slot share them).

impl "naive" is the honest baseline: the per-term loop of qops.reference.mixed_quant_conv (torch's own
learnable fake quantization) for the single convolutions, torch's fake quantization for the composites,
and in noise mode torch.randn noise as the QuantNAS code draws it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import qops
from qnas.errors import QnasError
from qnas.nas.graph import (
    CompiledSpace,
    GraphModule,
    LayerSite,
    conv2d_same,
    init_kernel,
    op_macs_per_pixel,
)
from qnas.nas.options import IMPLS, MIX_NORMS, MODES, SUPERNET_INITS  # noqa: F401  (qnas search choices)
from qnas.quant.quantizers import load_log_steps
from qnas.spaces import is_single_conv, op_stages
from qops import quant_range, reference
from qops.mixed_quant_conv import MixedQuantConvSpec, mixed_quant_conv

FULL_PRECISION_BITS = 32


def cost_bits(b: int) -> int:
    """Bits as BitOps count them: 0 (full precision) counts as 32."""
    return FULL_PRECISION_BITS if b == 0 else int(b)


def _grad_scaled(t: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """t in the forward, gradient times factor in the backward (LSQ's step-size gradient scale)."""
    scaled = t * factor
    return (t - scaled).detach() + scaled


def _log_step(step: torch.Tensor | float) -> torch.Tensor:
    """log of an LSQ step (floored at 1e-8): the supernet learns its steps in the log domain."""
    return torch.as_tensor(step).clamp_min(1e-8).log()


def _positive(scale: torch.Tensor) -> torch.Tensor:
    """A step floored at 1e-8 (the steps are exp of log-steps, positive but able to underflow)."""
    return scale.abs().clamp_min(1e-8)


def _sub_seed(seed: int, k: int) -> int:
    """Independent noise seeds for the k-th noisy tensor of a layer call (splitmix-style spread)."""
    return (seed + 0x9E3779B97F4A7C15 * (k + 1)) % (1 << 62)


def _pad(window: tuple[int, int]) -> tuple[int, int]:
    return (window[0] - 1) // 2, (window[1] - 1) // 2


def _embed(w: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """A kernel zero-padded (centred) to a larger odd window: the same "same"-padded convolution."""
    dh, dw = (window[0] - w.shape[2]) // 2, (window[1] - w.shape[3]) // 2
    return F.pad(w, (dw, dw, dh, dh)) if dh or dw else w


def _block_noise(h: torch.Tensor, widths: list[int], bits: int, seed: int) -> torch.Tensor:
    """Quantization noise with one range per block of channels (each block is one term's tensor)."""
    if len(set(widths)) == 1:
        # Channels are the fastest dimension of a channels-last tensor: split them into blocks in place.
        n, c, hh, ww = h.shape
        if h.is_contiguous(memory_format=torch.channels_last):
            v = h.permute(0, 2, 3, 1).view(n, hh, ww, len(widths), widths[0])
            return qops.quant_noise(v, bits, seed, axis=3).view(n, hh, ww, c).permute(0, 3, 1, 2)
        v = h.reshape(n, len(widths), widths[0], hh, ww)
        return qops.quant_noise(v, bits, seed, axis=1).view(n, c, hh, ww)
    parts, start = [], 0
    for k, w in enumerate(widths):
        parts.append(qops.quant_noise(h[:, start : start + w], bits, _sub_seed(seed, k)))
        start += w
    return torch.cat(parts, 1)


def split_entry(flat: int, n_w: int, n_a: int) -> tuple[int, int, int]:
    """(op, w_bits index, a_bits index) of a flat index into a slot's [op, w_bits, a_bits] entries."""
    o, rest = divmod(flat, n_w * n_a)
    i, j = divmod(rest, n_a)
    return o, i, j


def allowed_mask(n_ops: int, w_bits: list[int], a_bits: list[int], tie_bits: bool) -> torch.Tensor:
    """[n_ops, n_w, n_a] booleans: with tied bits only w_bits[i] == a_bits[j] entries are candidates."""
    mask = torch.ones(n_ops, len(w_bits), len(a_bits), dtype=torch.bool)
    if tie_bits:
        tie = torch.tensor([[wb == ab for ab in a_bits] for wb in w_bits], dtype=torch.bool)
        if not tie.any():
            raise QnasError(
                f"bits: tied weight/activation bits need a common value, got {w_bits} and {a_bits}"
            )
        mask &= tie.unsqueeze(0)
    return mask


def fixed_bits_mask(
    slot: str, fixed: dict[str, tuple[int, int]], w_bits: list[int], a_bits: list[int]
) -> torch.Tensor:
    """[1, n_w, n_a] booleans: only the slot's fixed (w_bits, a_bits) pair (a two-stage search: the bits
    come from a first search, the ops are searched at them)."""
    if slot not in fixed:
        raise QnasError(f"--fix-bits: the genotype has no layer {slot!r} (it must come from the same space)")
    wb, ab = fixed[slot]
    if wb not in w_bits or ab not in a_bits:
        raise QnasError(
            f"--fix-bits: layer {slot} is at {wb}/{ab} bits, not among the searched --bits {w_bits} / {a_bits}"
        )
    mask = torch.zeros(1, len(w_bits), len(a_bits), dtype=torch.bool)
    mask[0, w_bits.index(wb), a_bits.index(ab)] = True
    return mask


def slot_bitops(compiled: CompiledSpace, w_bits: list[int], a_bits: list[int]) -> dict[str, torch.Tensor]:
    """BitOps per LR input pixel of every (op, w_bits, a_bits) term of every slot, summed over the sites
    of the slot: {slot: float64 [n_ops, n_w, n_a]} (layers after the pixel shuffle count scale² pixels)."""
    out = {}
    for slot, cands in compiled.slots.items():
        cost = torch.zeros(len(cands), len(w_bits), len(a_bits), dtype=torch.float64)
        for site in compiled.slot_sites(slot):
            for o, c in enumerate(site.candidates):
                macs = op_macs_per_pixel(compiled.ops[c], site.in_ch, site.out_ch) * site.pixels
                for i, wb in enumerate(w_bits):
                    for j, ab in enumerate(a_bits):
                        cost[o, i, j] += macs * cost_bits(wb) * cost_bits(ab)
        out[slot] = cost
    return out


class SearchLayer(nn.Module):
    """One searched layer (see the module docstring). Called as layer(x, probs_by_slot)."""

    def __init__(
        self,
        site: LayerSite,
        ops: dict[str, dict],
        w_bits: list[int],
        a_bits: list[int],
        allowed: torch.Tensor,
        mode: str,
        impl: str,
    ):
        super().__init__()
        self.slot, self.mode, self.impl = site.slot, mode, impl
        self.in_ch, self.out_ch = site.in_ch, site.out_ch
        self.w_bits, self.a_bits = list(w_bits), list(a_bits)
        self.relu = site.act == "relu"
        self.a_signed = not self.relu
        self.candidates = list(site.candidates)
        self.single_idx = [k for k, c in enumerate(site.candidates) if is_single_conv(ops[c])]
        self.composite_idx = [k for k, c in enumerate(site.candidates) if not is_single_conv(ops[c])]
        n_w, n_a = len(w_bits), len(a_bits)
        self._terms = allowed.tolist()  # [o][i][j], candidate order
        weights, self.groups, self.dilations = [], [], []
        for k in self.single_idx:
            st = op_stages(ops[site.candidates[k]])[0]
            kh, kw = st["kernel"]
            shape = (site.out_ch, site.in_ch // st["groups"], kh, kw)
            weights.append(nn.Parameter(init_kernel(shape, self.relu)))
            self.groups.append(st["groups"])
            self.dilations.append(st["dilation"])
        self.weights = nn.ParameterList(weights)
        # LSQ steps, learned as their logarithms: see qnas.quant.quantizers.LSQQuantizer.
        self.log_w_scales = nn.Parameter(torch.zeros(max(len(weights), 1), n_w))
        self.log_a_scales = nn.Parameter(torch.zeros(n_a))
        self.bias = nn.Parameter(torch.zeros(site.out_ch))
        self.composites = nn.ModuleList(
            CompositeBranch(ops[site.candidates[k]], site.in_ch, site.out_ch, n_w, n_a, self.relu)
            for k in self.composite_idx
        )
        stages = [op_stages(ops[site.candidates[k]]) for k in self.composite_idx]
        self._stacked_composites = bool(stages) and all(
            len(st) == 2 and all(conv["groups"] == 1 and conv["dilation"] == 1 for conv in st)
            for st in stages
        )
        self._stack_windows = (
            [tuple(max(st[k]["kernel"][d] for st in stages) for d in (0, 1)) for k in (0, 1)]
            if self._stacked_composites
            else []
        )
        # Single candidates first in the slot's order lets the fused op take a view of the probs.
        self._single_prefix = self.single_idx == list(range(len(self.single_idx)))
        self.register_buffer(
            "single_index", torch.tensor(self.single_idx, dtype=torch.long), persistent=False
        )
        self.register_buffer("scales_initialized", torch.zeros((), dtype=torch.bool))
        self._initialized = False
        #: Noise stream of this process (its rank under torch.distributed, Supernet.set_noise_stream).
        self.noise_stream = 0

    @property
    def w_scales(self) -> torch.Tensor:
        """Weight steps [single candidate, w_bits] (exp of the learned log-steps, in the autograd graph)."""
        return self.log_w_scales.exp()

    @property
    def a_scales(self) -> torch.Tensor:
        """Input activation steps [a_bits], shared by the slot's candidates."""
        return self.log_a_scales.exp()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        load_log_steps(state_dict, prefix, ("w_scales", "a_scales"))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._initialized = bool(self.scales_initialized)

    # -- LSQ ----------------------------------------------------------------------------------------
    def _qmax(self, bits: int, signed: bool) -> int:
        return quant_range(bits, signed)[1]

    def w_grad_factor(self, numel: int, bits: int) -> float:
        return 1.0 / math.sqrt(numel * self._qmax(bits, True)) if bits else 1.0

    def a_grad_factor(self, x: torch.Tensor, bits: int, signed: bool) -> float:
        return 1.0 / math.sqrt(x[0].numel() * self._qmax(bits, signed)) if bits else 1.0

    @torch.no_grad()
    def _init_scales(self, x: torch.Tensor) -> None:
        """LSQ's data-driven init 2 mean|v| / sqrt(qmax), once (buffer scales_initialized keeps it)."""
        from qnas.runs.distributed import whole_batch

        # Under torch.distributed x is this rank's share: the steps of the whole batch, as one process's.
        x = whole_batch(x)
        for o, w in enumerate(self.weights):
            for i, b in enumerate(self.w_bits):
                if b:
                    self.log_w_scales[o, i] = _log_step(2 * w.abs().mean() / math.sqrt(self._qmax(b, True)))
        for j, b in enumerate(self.a_bits):
            if b:
                self.log_a_scales[j] = _log_step(2 * x.abs().mean() / math.sqrt(self._qmax(b, self.a_signed)))
        for br in self.composites:
            br.init_scales(x, self.w_bits, self.a_bits)

    # -- quantizers (per tensor, zero point 0) -------------------------------------------------------
    def fq(
        self, t: torch.Tensor, scale: torch.Tensor, bits: int, signed: bool, gf: float, seed: int
    ) -> torch.Tensor:
        """Fake quantization of t (mode quant) or quantization noise (mode noise) at `bits`."""
        if bits == 0:
            return t
        if self.mode == "noise":
            if self.impl == "naive":  # what the QuantNAS code does: torch's RNG, range of the tensor
                lo, hi = torch.aminmax(t.detach())
                noise = (hi - lo) / (2**bits - 1) * torch.randn_like(t) / 2
                return t + noise
            return qops.quant_noise(t, bits, seed)
        qmin, qmax = quant_range(bits, signed)
        zp = torch.zeros(1, device=t.device)
        s = _positive(scale).reshape(1)
        if self.impl == "naive":
            return torch._fake_quantize_learnable_per_tensor_affine(t, s, zp, qmin, qmax, gf)
        return qops.fake_quant(t, s, zp, -1, qmin, qmax, gf)

    # -- forward ------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, probs_by_slot: dict[str, torch.Tensor | int]) -> torch.Tensor:
        """probs_by_slot[slot]: the mixing weights of every (op, w_bits, a_bits) entry, or an int, the
        flat index of one entry (a single path: only that candidate is computed, Supernet.forward_path)."""
        probs = probs_by_slot[self.slot]
        if self.relu:
            x = F.relu(x)
        if self.mode == "quant" and not self._initialized:
            self._init_scales(x)
            self.scales_initialized.fill_(True)
            self._initialized = True
        seed = int(torch.randint(0, 2**62, (1,)).item()) if self.mode == "noise" else 0
        if self.noise_stream:  # every rank draws the same seed (same RNG): spread it per rank
            seed = _sub_seed(seed, 1_000_003 * self.noise_stream)
        if isinstance(probs, int):
            return self._path(x, probs, seed)
        y = None
        if self.weights:
            y = self._single(x, probs, seed)
        if self.composites:
            xq: dict[int, torch.Tensor] = {}

            def act_variant(j: int) -> torch.Tensor:
                if j not in xq:
                    b = self.a_bits[j]
                    gf = self.a_grad_factor(x, b, self.a_signed)
                    xq[j] = self.fq(x, self.a_scales[j], b, self.a_signed, gf, _sub_seed(seed, 1000 + j))
                return xq[j]

            if self.impl == "fused" and self._stacked_composites:
                t = self._composites_stacked(act_variant, probs, seed)
            else:
                t = self._composites_per_term(act_variant, probs, seed)
            y = t if y is None else y + t
            if not self.weights:
                y = y + self.bias.reshape(1, -1, 1, 1)
        return y

    def _path(self, x: torch.Tensor, flat: int, seed: int) -> torch.Tensor:
        """The output of one (op, w_bits, a_bits) entry alone: what the mixture computes at a one-hot
        probability (same quantizers, steps and bias), at the cost of that candidate only."""
        o, i, j = split_entry(flat, len(self.w_bits), len(self.a_bits))
        if not self._terms[o][i][j]:
            raise QnasError(
                f"{self.slot}: entry {flat} (op {self.candidates[o]}, bits {i}/{j}) is not allowed"
            )
        ab = self.a_bits[j]
        xq = self.fq(
            x,
            self.a_scales[j],
            ab,
            self.a_signed,
            self.a_grad_factor(x, ab, self.a_signed),
            _sub_seed(seed, 1000 + j),
        )
        if o in self.single_idx:
            k = self.single_idx.index(o)
            w, wb = self.weights[k], self.w_bits[i]
            wq = self.fq(
                w, self.w_scales[k, i], wb, True, self.w_grad_factor(w.numel(), wb), _sub_seed(seed, 100 + i)
            )
            y = conv2d_same(xq, wq, self.groups[k], self.dilations[k])
        else:
            y = self.composites[self.composite_idx.index(o)](self, xq, i, j, _sub_seed(seed, 2000 + i))
        return y + self.bias.reshape(1, -1, 1, 1)

    def _composites_per_term(self, act_variant, probs: torch.Tensor, seed: int) -> torch.Tensor:
        """Every (composite, i, j) term on its own: the definition, and the naive baseline."""
        y = None
        for c, (k, br) in enumerate(zip(self.composite_idx, self.composites, strict=True)):
            for i in range(len(self.w_bits)):
                for j in range(len(self.a_bits)):
                    if self._terms[k][i][j]:
                        term = probs[k, i, j] * br(
                            self, act_variant(j), i, j, _sub_seed(seed, 2000 + 64 * c + 8 * i + j)
                        )
                        y = term if y is None else y + term
        return y

    def _composites_stacked(self, act_variant, probs: torch.Tensor, seed: int) -> torch.Tensor:
        """All two-stage composites at once, per activation bit-width j: the first convolutions of every
        allowed (composite, i) term side by side as one convolution (kernels zero-embedded in the largest
        window), their quantized outputs through one second convolution whose input blocks carry
        probs[o,i,j] * FQw_i(second kernel). Same sum as _composites_per_term, 2 convolutions per j
        instead of 2 per term."""
        w1_win = self._stack_windows[0]
        w2_win = self._stack_windows[1]
        y = None
        for j, ab in enumerate(self.a_bits):
            blocks = [
                (c, i)
                for c, k in enumerate(self.composite_idx)
                for i in range(len(self.w_bits))
                if self._terms[k][i][j]
            ]
            if not blocks:
                continue
            first, second, mid_scales, widths = [], [], [], []
            for c, i in blocks:
                br, wb = self.composites[c], self.w_bits[i]
                w1, w2 = br.weights[0], br.weights[1]
                sd = _sub_seed(seed, 3000 + 64 * c + 8 * i + j)
                first.append(
                    _embed(
                        self.fq(w1, br.w_scales[0, i], wb, True, self.w_grad_factor(w1.numel(), wb), sd),
                        w1_win,
                    )
                )
                w2q = self.fq(
                    w2, br.w_scales[1, i], wb, True, self.w_grad_factor(w2.numel(), wb), _sub_seed(sd, 1)
                )
                second.append(probs[self.composite_idx[c], i, j] * _embed(w2q, w2_win))
                widths.append(w1.shape[0])
                mid_scales.append(br.mid_scales[0, j].expand(w1.shape[0]))
            xj = act_variant(j)
            h = F.relu(F.conv2d(xj, torch.cat(first), None, 1, _pad(w1_win)))
            if ab:
                if self.mode == "quant":
                    # One LSQ step per block; gradient scale 1/sqrt(numel*qmax) of the block's own tensor.
                    hw = h.shape[2] * h.shape[3]
                    qmax = quant_range(ab, False)[1]
                    factors = torch.cat(
                        [torch.full((w,), 1.0 / math.sqrt(w * hw * qmax), dtype=h.dtype) for w in widths]
                    )
                    scale = _positive(_grad_scaled(torch.cat(mid_scales), factors))
                    h = qops.fake_quant(h, scale, torch.zeros_like(scale), 1, 0, qmax, 1.0)
                else:
                    h = _block_noise(h, widths, ab, _sub_seed(seed, 4000 + j))
            yj = F.conv2d(h, torch.cat(second, 1), None, 1, _pad(w2_win))
            y = yj if y is None else y + yj
        return y

    def _single(self, x: torch.Tensor, probs: torch.Tensor, seed: int) -> torch.Tensor:
        p = probs[: len(self.single_idx)] if self._single_prefix else probs.index_select(0, self.single_index)
        if self.mode == "quant":
            wf = torch.tensor(
                [[self.w_grad_factor(w.numel(), b) for b in self.w_bits] for w in self.weights], dtype=x.dtype
            )
            af = torch.tensor([self.a_grad_factor(x, b, self.a_signed) for b in self.a_bits], dtype=x.dtype)
            w_scales = _positive(_grad_scaled(self.w_scales, wf))
            a_scales = _positive(_grad_scaled(self.a_scales, af))
        else:
            w_scales, a_scales = self.w_scales, self.a_scales
        spec = MixedQuantConvSpec(
            self.w_bits, self.a_bits, self.groups, self.dilations, self.a_signed, 1, self.mode
        )
        if self.impl == "fused":
            return mixed_quant_conv(x, list(self.weights), p, w_scales, a_scales, self.bias, spec, seed)
        terms = [self._terms[k] for k in self.single_idx]
        if self.mode == "quant":
            return reference.mixed_quant_conv(
                x, list(self.weights), p, w_scales, a_scales, self.bias, spec, 0, terms=terms
            )
        # Naive noise: the per-term loop with torch.randn noise (reference.mixed_quant_conv's noise mode
        # reproduces the kernels' Philox streams in pure torch, far slower than anything a user would write).
        xq = {}
        y = None
        for o, w in enumerate(self.weights):
            for i, wb in enumerate(self.w_bits):
                wq = None
                for j, ab in enumerate(self.a_bits):
                    if not terms[o][i][j]:
                        continue
                    if j not in xq:
                        xq[j] = self.fq(x, a_scales[j], ab, self.a_signed, 1.0, 0)
                    if wq is None:
                        wq = self.fq(w, w_scales[o, i], wb, True, 1.0, 0)
                    term = p[o, i, j] * conv2d_same(xq[j], wq, self.groups[o], self.dilations[o])
                    y = term if y is None else y + term
        return y + self.bias.reshape(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return (
            f"{self.slot}: {self.in_ch}->{self.out_ch}, candidates={self.candidates}, w_bits={self.w_bits}, "
            f"a_bits={self.a_bits}, mode={self.mode}, impl={self.impl}"
        )


class CompositeBranch(nn.Module):
    """A composite candidate (convolutions in sequence) of a SearchLayer: kernels, LSQ steps of each
    stage's weights per weight bit-width, and of the activations between stages per activation bit-width."""

    def __init__(self, op: dict, in_ch: int, out_ch: int, n_w: int, n_a: int, relu: bool = True):
        super().__init__()
        self.stages = op_stages(op)
        ws, cin = [], in_ch
        for k, st in enumerate(self.stages):
            cout = out_ch if k == len(self.stages) - 1 else out_ch * st["width"]
            kh, kw = st["kernel"]
            # The first stage reads the layer's input (relu'd unless the layer's act is "none"), the
            # others the relu between stages.
            ws.append(nn.Parameter(init_kernel((cout, cin // st["groups"], kh, kw), relu or k > 0)))
            cin = cout
        self.weights = nn.ParameterList(ws)
        self.log_w_scales = nn.Parameter(torch.zeros(len(ws), n_w))  # log-steps, as SearchLayer's
        self.log_mid_scales = nn.Parameter(torch.zeros(max(len(ws) - 1, 1), n_a))

    @property
    def w_scales(self) -> torch.Tensor:
        """Weight steps [stage, w_bits]."""
        return self.log_w_scales.exp()

    @property
    def mid_scales(self) -> torch.Tensor:
        """Steps of the activations between stages [stage - 1, a_bits]."""
        return self.log_mid_scales.exp()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        load_log_steps(state_dict, prefix, ("w_scales", "mid_scales"))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def init_scales(self, x: torch.Tensor, w_bits: list[int], a_bits: list[int]) -> None:
        """LSQ init: weight steps from each kernel, the steps between stages from the full-precision
        activations the stage sees on this first batch (x: the layer's input after its relu)."""
        h = x
        for s, (st, w) in enumerate(zip(self.stages, self.weights, strict=True)):
            for i, b in enumerate(w_bits):
                if b:
                    self.log_w_scales[s, i] = _log_step(
                        2 * w.abs().mean() / math.sqrt(quant_range(b, True)[1])
                    )
            if s > 0:
                h = F.relu(h)
                for j, b in enumerate(a_bits):
                    if b:
                        self.log_mid_scales[s - 1, j] = _log_step(
                            2 * h.abs().mean() / math.sqrt(quant_range(b, False)[1])
                        )
            h = conv2d_same(h, w, st["groups"], st["dilation"])

    def forward(self, layer: SearchLayer, xq: torch.Tensor, i: int, j: int, seed: int) -> torch.Tensor:
        wb, ab = layer.w_bits[i], layer.a_bits[j]
        h = xq
        for s, (st, w) in enumerate(zip(self.stages, self.weights, strict=True)):
            if s > 0:
                h = F.relu(h)
                h = layer.fq(
                    h,
                    self.mid_scales[s - 1, j],
                    ab,
                    False,
                    layer.a_grad_factor(h, ab, False),
                    _sub_seed(seed, s),
                )
            wq = layer.fq(
                w, self.w_scales[s, i], wb, True, layer.w_grad_factor(w.numel(), wb), _sub_seed(seed, 100 + s)
            )
            h = conv2d_same(h, wq, st["groups"], st["dilation"])
        return h


class Supernet(nn.Module):
    """The whole search network of a compiled space: a GraphModule of SearchLayers plus the architecture
    parameters ``alphas[slot]`` [n_ops, n_w_bits, n_a_bits] (named parameters, apart from the weights)."""

    def __init__(
        self,
        compiled: CompiledSpace,
        w_bits: list[int] = (4, 8),
        a_bits: list[int] | None = None,
        tie_bits: bool = True,
        mode: str = "noise",
        impl: str = "fused",
        adq: bool = True,
        mix_norm: str = "rescale",
        init: str = "anchor",
        fixed_bits: dict[str, tuple[int, int] | list[int]] | None = None,
    ):
        super().__init__()
        if init not in SUPERNET_INITS:
            raise QnasError(f"--supernet-init: expected one of {', '.join(SUPERNET_INITS)}, got {init!r}")
        if mix_norm not in MIX_NORMS:
            raise QnasError(f"--mix-norm: expected one of {', '.join(MIX_NORMS)}, got {mix_norm!r}")
        if mode not in MODES:
            raise QnasError(f"--mode: expected one of {', '.join(MODES)}, got {mode!r}")
        if impl not in IMPLS:
            raise QnasError(f"--impl: expected one of {', '.join(IMPLS)}, got {impl!r}")
        a_bits = list(w_bits) if a_bits is None else list(a_bits)
        for name, bits in (("w_bits", w_bits), ("a_bits", a_bits)):
            if not bits or any(b != 0 and not 2 <= b <= 8 for b in bits) or len(set(bits)) != len(bits):
                raise QnasError(f"--bits: {name} must be distinct values in {{0, 2..8}}, got {list(bits)}")
        self.compiled = compiled
        self.scale = compiled.scale
        self.w_bits, self.a_bits, self.tie_bits = list(w_bits), list(a_bits), bool(tie_bits)
        self.mode, self.impl, self.adq, self.mix_norm = mode, impl, adq, mix_norm
        #: Softmax temperature of the architecture distribution (1: plain softmax; set by the search loop).
        self.temperature = 1.0
        self.in_channels = int(compiled.space.get("colors", 3))
        self.slots = list(compiled.slots)
        self.alphas = nn.ParameterDict()
        masks = {}
        #: {slot: (w_bits, a_bits)} a two-stage search fixed (only the op is searched there), or None.
        self.fixed_bits = None if fixed_bits is None else {k: tuple(v) for k, v in fixed_bits.items()}
        extra = sorted(set(self.fixed_bits or {}) - set(compiled.slots))
        if extra:
            raise QnasError(
                f"--fix-bits: the genotype has layers {extra} this space does not (same space needed)"
            )
        for slot, cands in compiled.slots.items():
            masks[slot] = allowed_mask(len(cands), self.w_bits, self.a_bits, tie_bits)
            if self.fixed_bits is not None:
                masks[slot] &= fixed_bits_mask(slot, self.fixed_bits, self.w_bits, self.a_bits)
            self.alphas[_key(slot)] = nn.Parameter(
                1e-3 * torch.randn(len(cands), len(self.w_bits), len(self.a_bits))
            )
        self._masks = masks
        for slot, m in masks.items():
            self.register_buffer(f"allowed_{_key(slot)}", m, persistent=False)

        def make_layer(site: LayerSite) -> nn.Module:
            return SearchLayer(site, compiled.ops, self.w_bits, self.a_bits, masks[site.slot], mode, impl)

        self.net = GraphModule(compiled.graph, make_layer, adq)
        if init == "anchor":
            self.start_at_anchor()
        # BitOps per LR pixel of every (op, w, a) term, summed over the sites of a slot.
        for slot, cost in slot_bitops(compiled, self.w_bits, self.a_bits).items():
            self.register_buffer(f"bitops_{_key(slot)}", cost, persistent=False)

    #: Kernel scale of the output layer under init "anchor" (small, not zero: a zero kernel would give
    #: the layers before it no gradient in the first step).
    OUTPUT_LAYER_GAIN = 0.1

    @torch.no_grad()
    def start_at_anchor(self) -> None:
        """Make the supernet start as (nearly) its anchor skip: every ADQ branch gain w = 0 (its residual
        is the identity until w grows: ReZero, Bachlechner et al. 2020; SkipInit, De & Smith, NeurIPS
        2020) and the kernels of the network's last layer (the upsampler, which writes the image's
        residual) scaled by OUTPUT_LAYER_GAIN.

        Why: with variance-preserving kernels and ADQ's gain 1.5 every residual cell more than doubles
        its input's deviation, and the untrained supernet's output deviates from the image ~70x (std 20
        against 0.29 for the basic space at x4). The first weight steps then drive the inputs of the
        ReLU in front of the upsampler negative; it dies, and the loss gradient on every architecture
        weight before it is exactly zero for the rest of the search (measured: 13 to 91 % of the
        architecture steps, the cost term alone choosing those layers). Started at the anchor, no
        architecture step had a zero loss gradient (basic space, x4, 200 steps, docs/quantnas.md)."""
        from qnas.nas.adq import ADQ

        for m in self.net.modules():
            if isinstance(m, ADQ):
                m.w.zero_()
        last = [n.name for n in self.compiled.graph.nodes if n.op == "layer"]
        if last:
            layer = self.net.nodes[last[-1]]
            for w in layer.weights:
                w.mul_(self.OUTPUT_LAYER_GAIN)
            for br in layer.composites:
                br.weights[-1].mul_(self.OUTPUT_LAYER_GAIN)

    # -- architecture -------------------------------------------------------------------------------
    def alpha(self, slot: str) -> nn.Parameter:
        """The architecture parameters of a slot."""
        return self.alphas[_key(slot)]

    def allowed(self, slot: str) -> torch.Tensor:
        return getattr(self, f"allowed_{_key(slot)}")

    def probs(self) -> dict[str, torch.Tensor]:
        """Joint softmax of alphas / temperature over the allowed (op, w_bits, a_bits) entries of every slot
        (others exactly 0). The search anneals `temperature` (qnas.nas.search.temperature_at)."""
        out = {}
        for slot in self.slots:
            a = self.alphas[_key(slot)]
            logits = (a / self.temperature).masked_fill(~self.allowed(slot), float("-inf"))
            out[slot] = torch.softmax(logits.flatten(), 0).view_as(a)
        return out

    def mixing_weights(self, probs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The weights the layers mix their candidates with: the probabilities, or with mix_norm
        "rescale" p[o,i,j] / √(Σ_o P_o²), P_o = Σ_ij p[o,i,j] the probability of op o.

        A plain mixture of n ops whose outputs are uncorrelated (independent kernels) has √(Σ P_o²)
        times a single op's standard deviation (1/√6 at uniform p over six ops), and every layer of a
        chain shrinks the signal again, so the loss barely reaches the architecture parameters of the
        deep layers while a parallel skip layer carries the function. The rescaled mixture keeps the
        variance at any p and is exact at a one-hot p (the derived network). Bit-width variants of one
        op share its kernel, so their outputs are nearly equal: they are counted together (P_o), not as
        separate terms. (The rescaling follows the variance argument of He et al., ICCV 2015; it plays
        the role of the per-candidate normalisation of DARTS variants without changing the fused op.)"""
        if self.mix_norm == "none":
            return probs
        out = {}
        for slot, p in probs.items():
            per_op = p.sum(dim=(1, 2))
            out[slot] = p * per_op.square().sum().rsqrt()
        return out

    def forward(self, x: torch.Tensor, probs: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        return self.net(x, self.mixing_weights(self.probs() if probs is None else probs))

    def forward_path(self, x: torch.Tensor, path: dict[str, int]) -> torch.Tensor:
        """The supernet along one path: every slot computes only its entry path[slot] (a flat index into
        its [op, w_bits, a_bits] entries), as the derived network of that genotype would, with the
        supernet's shared weights (single-path one-shot: Guo et al., ECCV 2020)."""
        return self.net(x, path)

    def sample_path(self, generator: torch.Generator | None = None) -> dict[str, int]:
        """One allowed entry per slot, uniformly at random."""
        out = {}
        for slot in self.slots:
            entries = self.entries(slot)
            out[slot] = entries[int(torch.randint(len(entries), (1,), generator=generator))]
        return out

    def entries(self, slot: str) -> list[int]:
        """The flat indices of a slot's allowed (op, w_bits, a_bits) entries."""
        return self.allowed(slot).flatten().nonzero().flatten().tolist()

    def entry(self, slot: str, flat: int) -> dict[str, Any]:
        """The (op, w_bits, a_bits) of a slot's flat entry index."""
        o, i, j = split_entry(flat, len(self.w_bits), len(self.a_bits))
        return {"op": self.compiled.slots[slot][o], "w_bits": self.w_bits[i], "a_bits": self.a_bits[j]}

    def entry_bitops(self, slot: str) -> torch.Tensor:
        """BitOps per LR input pixel of each flat (op, w_bits, a_bits) entry of a slot."""
        return getattr(self, f"bitops_{_key(slot)}").flatten()

    def expected_bitops_per_pixel(self, probs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Σ_sites Σ probs · BitOps of each term, per LR input pixel (differentiable in the probs)."""
        total = None
        for slot in self.slots:
            cost = getattr(self, f"bitops_{_key(slot)}").to(probs[slot].dtype)
            term = (probs[slot] * cost).sum()
            total = term if total is None else total + term
        return total

    def entropy(self, probs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Σ_slots H(probs[slot]) = -Σ p log p over the allowed entries (each shared slot once)."""
        total = None
        for slot in self.slots:
            p = probs[slot][self.allowed(slot)]
            h = -(p * torch.log(p.clamp_min(1e-30))).sum()
            total = h if total is None else total + h
        return total

    def choices(self, budget: float | None = None) -> dict[str, dict[str, Any]]:
        """The (op, w_bits, a_bits) of every slot with its probability: the argmax of each slot, or with
        `budget` (BitOps per LR pixel) the most probable genotype that costs at most the budget.

        The search drives the *expected* BitOps to its target, but the argmax of a distribution that is
        not one-hot can cost far more or less (a flat body slot's argmax is any of its candidates): a
        user who asks for a target gets a network within it. Most probable = largest Σ_slots log p of
        the chosen entries, found exactly by dynamic programming over the slots on a cost grid of
        budget/4096 (costs rounded up, so the result never exceeds the budget); when even the cheapest
        genotype exceeds it, the cheapest genotype."""
        with torch.no_grad():
            probs = {slot: p.double() for slot, p in self.probs().items()}
        picks = {slot: int(torch.argmax(p.flatten())) for slot, p in probs.items()}
        if budget is not None:
            logp = {s: p.flatten().clamp_min(1e-300).log() for s, p in probs.items()}
            picks = self.best_within(logp, float(budget))
        out = {}
        for slot in self.slots:
            p, flat = probs[slot], picks[slot]
            out[slot] = {**self.entry(slot, flat), "prob": round(float(p.flatten()[flat]), 6)}
        return out

    def best_within(self, scores: dict[str, torch.Tensor], budget: float) -> dict[str, int]:
        """The genotype (flat entry per slot) with the largest Σ_slots scores[slot][entry] whose BitOps
        per LR pixel are at most `budget`: exact dynamic programming over the slots on a cost grid of
        budget/4096 (costs rounded up, so the result never exceeds the budget); when even the cheapest
        genotype exceeds it, the cheapest genotype. Scores: log-probabilities (DARTS derivation) or
        negated held-out losses (single-path selection)."""
        cost = {s: self.entry_bitops(s) for s in self.slots}
        entries = {s: self.entries(s) for s in self.slots}
        cheapest = {s: min(entries[s], key=lambda e: float(cost[s][e])) for s in self.slots}
        if sum(float(cost[s][cheapest[s]]) for s in self.slots) > budget:
            return cheapest
        bins = 4096
        unit = budget / bins
        neg = float("-inf")
        best = [0.0] + [neg] * bins  # best[c]: max Σ log p of the slots so far at cost c units
        back = []
        for s in self.slots:
            logp = scores[s].flatten().double()
            new, arg = [neg] * (bins + 1), [-1] * (bins + 1)
            for e in entries[s]:
                units = math.ceil(float(cost[s][e]) / unit - 1e-9)
                if units > bins:
                    continue
                lp = float(logp[e])
                for c in range(bins - units + 1):
                    if best[c] != neg and best[c] + lp > new[c + units]:
                        new[c + units], arg[c + units] = best[c] + lp, e
            back.append(arg)
            best = new
        c = max(range(bins + 1), key=lambda k: best[k])
        if best[c] == neg:  # only when rounding up to the grid excludes every genotype
            return cheapest
        picks = {}
        for s, arg in zip(reversed(self.slots), reversed(back), strict=True):
            e = arg[c]
            picks[s] = e
            c -= math.ceil(float(cost[s][e]) / unit - 1e-9)
        return picks

    def set_noise_stream(self, stream: int) -> None:
        """Noise mode under torch.distributed: rank `stream` draws noise independent of the other ranks'
        (they share torch's RNG state, hence the per-call seeds); stream 0 draws what one process does."""
        for m in self.modules():
            if isinstance(m, SearchLayer):
                m.noise_stream = int(stream)

    def alpha_parameters(self) -> list[nn.Parameter]:
        return list(self.alphas.values())

    def weight_parameters(self) -> list[nn.Parameter]:
        ids = {id(p) for p in self.alphas.values()}
        return [p for p in self.parameters() if id(p) not in ids]


def _key(slot: str) -> str:
    """A slot as a parameter name (dots are not allowed there; node names are identifiers, so '-' is free)."""
    return slot.replace(".", "-")
