// mixed_quant_conv's device-neutral host code, shared by the CPU entry points (csrc/cpu/mixed_quant_conv.cpp) and
// the CUDA binding (csrc/cuda/mixed_quant_conv_binding.cpp): argument checks, the conv-group plan, the engine
// choice, and the orchestration around the vendor convolution (oneDNN / cuDNN through ATen, channels-last;
// NNPACK's FFT for large windows on the CPU) with the device's kernels (qops::mqc::Kernels).
// docs/MIXED_QUANT_CONV.md explains the design.
//
// forward:  xq = all activation variants in one pass over x (the device's act_forward kernel)
//           Wg = merged weight of each conv group (one small pass over the candidate weights)
//           y  = sum_g conv(xq, Wg) + bias            (usually one group: one convolution)
// backward: recomputes xq and Wg (cheaper in memory than saving xq, one fast pass), then
//           (grad xq, grad Wg, grad bias) = convolution_backward per group,
//           grad x and the a_scales LSQ sums      = one pass over x and grad xq,
//           grad weights, w_scales and probs      = one pass over the candidate weights and grad Wg.
#include <ATen/ATen.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>

#include "qops/checks.h"
#include "qops/mixed_quant_conv.h"
#include "qops/mixed_quant_conv_host.h"

namespace qops::mqc {

namespace {

bool valid_bits(int64_t b) { return b == 0 || (b >= 2 && b <= 8); }

void check_bits(c10::IntArrayRef bits, const char* name) {
  TORCH_CHECK(!bits.empty(), name, ": expected at least one bit-width");
  TORCH_CHECK(static_cast<int>(bits.size()) <= kMqcMaxBits, name, ": expected at most ", kMqcMaxBits,
              " bit-widths, got ", bits.size());
  for (int64_t b : bits) TORCH_CHECK(valid_bits(b), name, ": bit-widths must be 0 (full precision) or 2..8, got ", bits);
}

// QOPS_MQC_ENGINE=auto|onednn|nnpack picks the CPU convolution engine (tests and benchmarks). auto: NNPACK
// for dense, undilated, stride-1 groups with windows of 5x5 taps or more, where its FFT convolution beats
// oneDNN's direct one about twofold on AVX2 (bench/bench_mixed_quant_conv.py); oneDNN otherwise.
int engine_mode() {
  const char* env = std::getenv("QOPS_MQC_ENGINE");
  if (env == nullptr || std::strcmp(env, "auto") == 0 || env[0] == '\0') return 0;
  if (std::strcmp(env, "onednn") == 0) return 1;
  if (std::strcmp(env, "nnpack") == 0) return 2;
  TORCH_CHECK(false, "QOPS_MQC_ENGINE: expected auto, onednn or nnpack, got '", env, "'");
  return 0;
}

// QOPS_MQC_PLAN=auto|merged|split overrides the split rule (tests and benchmarks; the result is the same).
int plan_mode() {
  const char* env = std::getenv("QOPS_MQC_PLAN");
  if (env == nullptr || std::strcmp(env, "auto") == 0 || env[0] == '\0') return 0;
  if (std::strcmp(env, "merged") == 0) return 1;
  if (std::strcmp(env, "split") == 0) return 2;
  TORCH_CHECK(false, "QOPS_MQC_PLAN: expected auto, merged or split, got '", env, "'");
  return 0;
}

}  // namespace

Args check_args(const at::Tensor& x, at::TensorList weights, const at::Tensor& probs, c10::IntArrayRef w_bits,
                c10::IntArrayRef a_bits, const at::Tensor& w_scales, const at::Tensor& a_scales, bool a_signed,
                c10::IntArrayRef groups, c10::IntArrayRef dilations, int64_t stride, bool has_bias,
                std::string_view mode, int64_t seed, bool check_scale_values) {
  Args a;
  TORCH_CHECK(mode == "quant" || mode == "noise", "mode: expected \"quant\" or \"noise\", got \"", std::string(mode),
              "\"");
  a.noise = mode == "noise";
  a.seed = seed;
  a.a_signed = a_signed;
  a.has_bias = has_bias;
  check_dtype(x, at::kFloat, "x");
  check_dim(x, 4, "x");
  a.N = x.size(0);
  a.cin = x.size(1);
  a.H = x.size(2);
  a.W = x.size(3);
  TORCH_CHECK(a.cin > 0, "x: expected at least one channel, got shape ", x.sizes());
  TORCH_CHECK(stride >= 1, "stride: expected >= 1, got ", stride);
  // A stride or dilation beyond the input changes nothing (one output row and column; every tap but the centre
  // reads padding), so both are clamped to the input's size: the padding, the merged windows and the engines'
  // buffers then stay as large as the input justifies (a dilation of 2^40 would ask for a terabyte of padding).
  const int64_t extent = std::max<int64_t>({a.H, a.W, 1});
  a.stride = std::min(stride, extent);
  a.Ho = a.H == 0 ? 0 : (a.H - 1) / a.stride + 1;
  a.Wo = a.W == 0 ? 0 : (a.W - 1) / a.stride + 1;

  a.n_ops = static_cast<int64_t>(weights.size());
  TORCH_CHECK(a.n_ops >= 1, "weights: expected at least one candidate weight");
  TORCH_CHECK(a.n_ops <= kMqcMaxOps, "weights: expected at most ", kMqcMaxOps, " candidates, got ", a.n_ops);
  TORCH_CHECK(static_cast<int64_t>(groups.size()) == a.n_ops, "groups: expected one entry per weight (",
              a.n_ops, "), got ", groups.size());
  TORCH_CHECK(static_cast<int64_t>(dilations.size()) == a.n_ops, "dilations: expected one entry per weight (",
              a.n_ops, "), got ", dilations.size());
  for (int64_t o = 0; o < a.n_ops; ++o) {
    const at::Tensor& w = weights[o];
    const std::string name = "weights[" + std::to_string(o) + "]";
    check_dtype(w, at::kFloat, name.c_str());
    check_dim(w, 4, name.c_str());
    check_same_device(w, x, name.c_str(), "x");
    const int64_t g = groups[o], d = dilations[o];
    TORCH_CHECK(g >= 1, "groups: entry ", o, " must be >= 1, got ", g);
    TORCH_CHECK(d >= 1, "dilations: entry ", o, " must be >= 1, got ", d);
    if (o == 0) a.cout = w.size(0);
    TORCH_CHECK(w.size(0) == a.cout, name, ": expected ", a.cout, " output channels like weights[0], got shape ",
                w.sizes());
    TORCH_CHECK(a.cin % g == 0, "groups: entry ", o, " (", g, ") does not divide the input channels (", a.cin, ")");
    TORCH_CHECK(a.cout % g == 0, "groups: entry ", o, " (", g, ") does not divide the output channels (", a.cout,
                ")");
    TORCH_CHECK(w.size(1) * g == a.cin, name, ": expected in-channels Cin/groups = ", a.cin / g, ", got shape ",
                w.sizes());
    TORCH_CHECK(w.size(2) % 2 == 1 && w.size(3) % 2 == 1, name,
                ": kernel sizes must be odd (\"same\" padding keeps every candidate centred), got shape ", w.sizes());
    a.cands.push_back(MqcCandidate{w.size(2), w.size(3), g, std::min(d, extent)});
  }
  TORCH_CHECK(a.cout > 0, "weights: expected at least one output channel");

  check_bits(w_bits, "w_bits");
  check_bits(a_bits, "a_bits");
  a.w_bits.assign(w_bits.begin(), w_bits.end());
  a.a_bits.assign(a_bits.begin(), a_bits.end());
  a.n_w = static_cast<int64_t>(w_bits.size());
  a.n_a = static_cast<int64_t>(a_bits.size());

  check_dtype(probs, at::kFloat, "probs");
  check_same_device(probs, x, "probs", "x");
  TORCH_CHECK(probs.sizes() == c10::IntArrayRef({a.n_ops, a.n_w, a.n_a}), "probs: expected shape [n_ops, len(w_bits), len(a_bits)] = [",
              a.n_ops, ", ", a.n_w, ", ", a.n_a, "], got ", probs.sizes());
  check_dtype(w_scales, at::kFloat, "w_scales");
  check_same_device(w_scales, x, "w_scales", "x");
  TORCH_CHECK(w_scales.sizes() == c10::IntArrayRef({a.n_ops, a.n_w}), "w_scales: expected shape [n_ops, len(w_bits)] = [",
              a.n_ops, ", ", a.n_w, "], got ", w_scales.sizes());
  check_dtype(a_scales, at::kFloat, "a_scales");
  check_same_device(a_scales, x, "a_scales", "x");
  TORCH_CHECK(a_scales.sizes() == c10::IntArrayRef({a.n_a}), "a_scales: expected shape [len(a_bits)] = [", a.n_a,
              "], got ", a_scales.sizes());
  if (!a.noise && check_scale_values) {
    // Only the entries that quantize need a scale; full-precision entries (bits 0) ignore theirs. The scales
    // are tiny: read them on the host (a copy, and a sync, where they live on a GPU).
    const at::Tensor ws = w_scales.to(at::kCPU).contiguous(), as = a_scales.to(at::kCPU).contiguous();
    const float* wp = ws.data_ptr<float>();
    const float* ap = as.data_ptr<float>();
    // An infinite step quantizes everything to 0 * inf = NaN: finite and positive, as fake_quant requires.
    auto usable = [](float s) { return std::isfinite(s) && s > 0.f; };
    for (int64_t o = 0; o < a.n_ops; ++o)
      for (int64_t i = 0; i < a.n_w; ++i)
        TORCH_CHECK(a.w_bits[i] == 0 || usable(wp[o * a.n_w + i]),
                    "w_scales: every scale of a quantized entry must be positive and finite, got ", w_scales);
    for (int64_t j = 0; j < a.n_a; ++j)
      TORCH_CHECK(a.a_bits[j] == 0 || usable(ap[j]),
                  "a_scales: every scale of a quantized entry must be positive and finite, got ", a_scales);
  }

  a.plan = mqc_plan(a.cands.data(), static_cast<int>(a.n_ops), a.cin, a.cout, a.n_a, plan_mode());
  a.cb = a.cin / a.plan.channel_blocks;
  // Noise mode on the CPU writes xq plane by plane (NCHW), where the noise's logical order runs contiguously.
  if (a.noise && x.is_cpu()) a.xq_channels_last = false;
  const int engine = x.is_cpu() ? engine_mode() : 1;
  for (int g = 0; g < a.plan.n_groups && engine != 1; ++g) {
    const MqcConvGroup& grp = a.plan.group[g];
    const bool possible = a.N > 0 && a.stride == 1 && grp.groups == 1 && grp.dilation == 1 && grp.kh <= 15 &&
                          grp.kw <= 15 && at::_nnpack_available();
    a.nnpack[g] = possible && (engine == 2 || grp.kh * grp.kw >= 25);
    if (a.nnpack[g]) a.xq_channels_last = false;
  }
  return a;
}

namespace {

std::vector<int64_t> group_padding(const MqcConvGroup& g) {
  return {g.dilation * (g.kh - 1) / 2, g.dilation * (g.kw - 1) / 2};
}

at::Tensor layout_for_kernels(const Args& a, const at::Tensor& x) {
  // The activation kernels read NCHW- or NHWC-contiguous x; anything else is made NCHW once. Noise mode
  // reads NCHW only: its noise follows the logical (NCHW) order, which then runs contiguously.
  if (x.is_contiguous() || (!a.noise && x.is_contiguous(at::MemoryFormat::ChannelsLast))) return x;
  return x.contiguous();
}

at::Tensor new_xq(const Args& a, const at::Tensor& x) {
  return at::empty({a.N, a.n_a * a.cin, a.H, a.W},
                   x.options().memory_format(a.xq_channels_last ? at::MemoryFormat::ChannelsLast
                                                                : at::MemoryFormat::Contiguous));
}

at::Tensor new_wg(const Args& a, int g, const at::Tensor& like) {
  const MqcConvGroup& grp = a.plan.group[g];
  // NNPACK wants an NCHW kernel; oneDNN/cuDNN take the channels-last one that matches xq.
  return at::empty({a.cout, a.n_a * a.cin / grp.groups, grp.kh, grp.kw},
                   like.options().memory_format(a.nnpack[g] ? at::MemoryFormat::Contiguous
                                                            : at::MemoryFormat::ChannelsLast));
}

at::Tensor merged_weight(const Args& a, const Kernels& k, int g, const at::Tensor& like, at::TensorList weights,
                         const at::Tensor& probs, const at::Tensor& w_scales) {
  at::Tensor wg = new_wg(a, g, like);
  RECORD_FUNCTION("mixed_quant_conv::merge_weight", {});
  k.merge_weight(a, g, weights, probs, w_scales, wg);
  return wg;
}

// wt[ci][co][KH-1-r][KW-1-c] = wg[co][ci][r][c]: the kernel of the input gradient (small; one serial pass
// instead of flip + transpose + copy, three parallel regions).
at::Tensor flipped_transpose(const at::Tensor& wg_in) {
  const at::Tensor wg = wg_in.contiguous();
  const int64_t co_n = wg.size(0), ci_n = wg.size(1), kh = wg.size(2), kw = wg.size(3);
  at::Tensor wt = at::empty({ci_n, co_n, kh, kw}, wg.options());
  const float* src = wg.data_ptr<float>();
  float* dst = wt.data_ptr<float>();
  for (int64_t co = 0; co < co_n; ++co)
    for (int64_t ci = 0; ci < ci_n; ++ci)
      for (int64_t r = 0; r < kh; ++r)
        for (int64_t c = 0; c < kw; ++c)
          dst[((ci * co_n + co) * kh + (kh - 1 - r)) * kw + (kw - 1 - c)] = src[((co * ci_n + ci) * kh + r) * kw + c];
  return wt;
}

at::Tensor activation_variants(const Args& a, const Kernels& k, const at::Tensor& x, const at::Tensor& a_scales) {
  at::Tensor xq = new_xq(a, x);
  RECORD_FUNCTION("mixed_quant_conv::act_forward", {});
  k.act_forward(a, x, a_scales, xq);
  return xq;
}

}  // namespace

at::Tensor forward(const Args& a, const Kernels& k, const at::Tensor& x_in, at::TensorList weights,
                   const at::Tensor& probs, const at::Tensor& w_scales, const at::Tensor& a_scales,
                   const std::optional<at::Tensor>& bias) {
  if (bias.has_value()) {
    qops::check_dtype(*bias, at::kFloat, "bias");
    qops::check_same_device(*bias, x_in, "bias", "x");
    TORCH_CHECK(bias->sizes() == at::IntArrayRef({a.cout}), "bias: expected shape [", a.cout, "], got ", bias->sizes());
  }
  // An input without rows or columns has an empty output (the engines refuse a convolution of it).
  if (a.H == 0 || a.W == 0) return at::empty({a.N, a.cout, a.Ho, a.Wo}, x_in.options());
  const at::Tensor x = layout_for_kernels(a, x_in);
  const at::Tensor xq = activation_variants(a, k, x, a_scales);
  at::Tensor y;
  for (int g = 0; g < a.plan.n_groups; ++g) {
    const MqcConvGroup& grp = a.plan.group[g];
    const at::Tensor wg = merged_weight(a, k, g, x, weights, probs, w_scales);
    const std::optional<at::Tensor> b = g == 0 ? bias : std::nullopt;
    at::Tensor yg = a.nnpack[g] ? at::_nnpack_spatial_convolution(xq, wg, b, group_padding(grp), {1, 1})
                                : at::convolution(xq, wg, b, {a.stride, a.stride}, group_padding(grp),
                                                  {grp.dilation, grp.dilation}, false, {0, 0}, grp.groups);
    if (g == 0)
      y = yg;
    else
      y.add_(yg);
  }
  // The output takes x's layout (as torch's convolution does), whatever the engines produced.
  return y.contiguous(is_nhwc(x_in) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
}

std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const Args& a, const Kernels& k, const at::Tensor& grad, const at::Tensor& x_in, at::TensorList weights,
    const at::Tensor& probs, const at::Tensor& w_scales, const at::Tensor& a_scales, const Mask& mask) {
  const bool need_data = mask[0] || mask[4];
  const bool need_weight = mask[1] || mask[2] || mask[3];
  const bool need_bias = mask[5] && a.has_bias;
  const at::Tensor x = layout_for_kernels(a, x_in);
  const auto opts = x.options();
  // Outputs that were not asked for come back as (distinct) empty tensors.
  auto empty = [&] { return at::empty({0}, opts); };
  at::Tensor gx = empty(), ga = empty(), gp = empty(), gws = empty(), gb = empty();
  std::vector<at::Tensor> gw_list;
  if (a.H == 0 || a.W == 0) {  // an empty input: every gradient is an empty sum
    if (mask[0]) gx = at::empty_like(x_in);
    if (mask[1])
      for (const at::Tensor& w : weights) gw_list.push_back(at::zeros_like(w));
    if (mask[2]) gp = at::zeros({a.n_ops, a.n_w, a.n_a}, opts);
    if (mask[3]) gws = at::zeros({a.n_ops, a.n_w}, opts);
    if (mask[4]) ga = at::zeros({a.n_a}, opts);
    if (need_bias) gb = at::zeros({a.cout}, opts);
    return {gx, gw_list, gp, gws, ga, gb};
  }

  // grad y in xq's layout, so that every convolution below reads one layout.
  const at::Tensor gy = grad.contiguous(a.xq_channels_last ? at::MemoryFormat::ChannelsLast
                                                           : at::MemoryFormat::Contiguous);
  at::Tensor gxq;
  std::vector<at::Tensor> gwg;
  if (need_data || need_weight) {
    const at::Tensor xq = activation_variants(a, k, x, a_scales);
    for (int g = 0; g < a.plan.n_groups; ++g) {
      const MqcConvGroup& grp = a.plan.group[g];
      const at::Tensor wg = merged_weight(a, k, g, x, weights, probs, w_scales);
      const bool bias_here = need_bias && need_weight && g == 0;
      const bool data_here = need_data && !a.nnpack[g];
      std::vector<int64_t> bias_sizes{a.cout};
      at::Tensor gxq_g, gw_g, gb_g;
      if (data_here || need_weight) {
        std::tie(gxq_g, gw_g, gb_g) = at::convolution_backward(
            gy, xq, wg, bias_here ? std::optional<at::IntArrayRef>(bias_sizes) : std::nullopt, {a.stride, a.stride},
            group_padding(grp), {grp.dilation, grp.dilation}, false, {0, 0}, grp.groups,
            {data_here, need_weight, bias_here});
      }
      if (need_data && a.nnpack[g]) {
        // Stride 1, "same" padding: the input gradient is the correlation of grad y with the kernel flipped
        // and its channel axes swapped, a forward convolution that NNPACK runs with its FFT.
        const at::Tensor wt = flipped_transpose(wg);
        gxq_g = at::_nnpack_spatial_convolution(gy, wt, std::nullopt, group_padding(grp), {1, 1});
      }
      if (need_data) {
        if (g == 0)
          gxq = gxq_g;
        else
          gxq.add_(gxq_g);
      }
      if (need_weight) gwg.push_back(gw_g);
      if (bias_here) gb = gb_g;
    }
  }
  if (need_bias && !gb.numel()) gb = gy.sum({0, 2, 3});

  if (need_data) {
    gx = at::empty_like(x);
    ga = at::empty({a.n_a}, opts);
    if (!gxq.is_contiguous() && !gxq.is_contiguous(at::MemoryFormat::ChannelsLast))
      gxq = gxq.contiguous(a.xq_channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
    RECORD_FUNCTION("mixed_quant_conv::act_backward", {});
    k.act_backward(a, x, a_scales, gxq, gx, ga);
    // grad x in x's own layout, as the fake kernel promises (differs only where noise mode made x NCHW).
    if (is_nhwc(x_in) && !is_nhwc(gx)) gx = gx.contiguous(at::MemoryFormat::ChannelsLast);
    if (!mask[0]) gx = empty();
    if (!mask[4]) ga = empty();
  }
  if (need_weight) {
    for (const at::Tensor& w : weights) gw_list.push_back(at::empty_like(w, at::MemoryFormat::Contiguous));
    gp = at::empty({a.n_ops, a.n_w, a.n_a}, opts);
    gws = at::empty({a.n_ops, a.n_w}, opts);
    RECORD_FUNCTION("mixed_quant_conv::weight_backward", {});
    k.weight_backward(a, gwg, weights, probs, w_scales, gw_list, gp, gws);
    for (int64_t o = 0; o < a.n_ops; ++o) {
      // The candidate weights may have come channels-last; hand back the gradient in their layout.
      if (!weights[o].is_contiguous() && weights[o].is_contiguous(at::MemoryFormat::ChannelsLast))
        gw_list[o] = gw_list[o].contiguous(at::MemoryFormat::ChannelsLast);
    }
    if (!mask[1]) gw_list.clear();
    if (!mask[2]) gp = empty();
    if (!mask[3]) gws = empty();
  }
  return {gx, gw_list, gp, gws, ga, gb};
}

}  // namespace qops::mqc

