// Shared pieces of mixed_quant_conv (the QuantNAS supernet layer) for the CPU kernels (csrc/cpu), the CUDA
// kernels (csrc/cuda) and the host orchestration: no torch headers here.
//
// The op computes y = sum_{o,i,j} probs[o,i,j] * conv_o(FQa_j(x), FQw_i(w_o)) + bias as a few convolutions
//     y = sum_g conv_g(xq, Wg),   xq = the activation variants FQa_j(x) side by side in the channel axis,
//     Wg = sum_{o in g, i} probs[o,i,:] * embed_{o->g}(FQw_i(w_o)),
// where the candidates are partitioned into "conv groups" g (mqc_plan below; usually one group). A group has
// a dilation D, a channel-group count G and a window KH x KW (in taps of D); every member o has D | d_o and
// G | groups_o, so its kernel embeds exactly: taps spread by d_o / D around the window's centre, its channel
// groups as a block diagonal inside the group's G blocks. Because kernels are odd and padding is "same"
// (d(k-1)/2 per side), every member keeps its centre and the group conv uses padding D(KH-1)/2 x D(KW-1)/2.
//
// Channel order of xq (n_a variants of Cin channels): with G* = lcm of the groups' G and Cb = Cin / G*,
//     xq channel of (variant j, input channel c) = (c / Cb) * n_a * Cb + j * Cb + c % Cb,
// i.e. blocks of Cb channels with all variants of a block together, so a group conv with G | G* sees each of
// its G input blocks contiguously (with G* = 1 it is simply j * Cin + c).
#pragma once

#include <cstdint>

#include "qops/fake_quant_math.h"
#include "qops/philox.h"
#include "qops/quant_noise_math.h"

namespace qops {

// Lists w_bits / a_bits hold at most this many entries (bits are 0 or 2..8, so 8 distinct values).
constexpr int kMqcMaxBits = 8;
// At most this many candidate operations.
constexpr int kMqcMaxOps = 32;

// Quantization range of `bits` (> 0): signed [-2^(b-1), 2^(b-1)-1] or unsigned [0, 2^b-1].
QOPS_HD void mqc_range(int bits, bool is_signed, float* qmin, float* qmax) {
  if (is_signed) {
    *qmin = -static_cast<float>(1 << (bits - 1));
    *qmax = static_cast<float>((1 << (bits - 1)) - 1);
  } else {
    *qmin = 0.f;
    *qmax = static_cast<float>((1 << bits) - 1);
  }
}

// xq channel of (variant j, input channel c); see the file comment.
QOPS_HD int64_t mqc_xq_channel(int64_t j, int64_t c, int64_t n_a, int64_t cb) {
  return (c / cb) * n_a * cb + j * cb + c % cb;
}

// Noise mode: each noise tensor of a call draws from the call's seed on its own Philox stream
// (csrc/include/qops/philox.h; stream 0 is quant_noise's): 1 + j for activation variant j, 1 + n_a + o * n_w + i
// for weight o at weight bit-width i. Element e of a tensor is its logical row-major index (NCHW for x,
// [cout, cin/groups, kh, kw] for weights). Mirrored in qops/reference.py (mixed_quant_conv_noise_streams).
QOPS_HD uint32_t mqc_act_stream(int64_t j) { return static_cast<uint32_t>(1 + j); }
QOPS_HD uint32_t mqc_weight_stream(int64_t n_a, int64_t n_w, int64_t o, int64_t i) {
  return static_cast<uint32_t>(1 + n_a + o * n_w + i);
}

// quant_noise's half step of a tensor with range [lo, hi] at `bits`: ((hi - lo) / (2^b - 1)) * 0.5, in float;
// the noisy value is fma(half_delta, eps, v) (v itself when half_delta == 0), as quant_noise computes it.
QOPS_HD float mqc_half_delta(float lo, float hi, int bits) {
  return quant_noise_half_delta(lo, hi, static_cast<float>((1 << bits) - 1));
}

QOPS_HD float mqc_noisy(float v, float half_delta, int64_t seed, uint32_t stream, uint64_t index) {
  return half_delta == 0.f ? v : philox_detail::fma32(half_delta, philox_normal(seed, stream, index), v);
}

// The activation variants as the CPU kernels take them (values read on the host): variant j is FQ with
// scale[j] / inv_scale[j] = 1 / scale[j] and range [qmin[j], qmax[j]], bits[j] == 0 = identity; in noise mode
// it is mqc_noisy(x, half_delta[j], seed, mqc_act_stream(j), NCHW index of the element) instead.
struct MqcActVariants {
  int n = 0;
  bool noise = false;
  int bits[kMqcMaxBits] = {};
  float scale[kMqcMaxBits] = {}, inv_scale[kMqcMaxBits] = {}, qmin[kMqcMaxBits] = {}, qmax[kMqcMaxBits] = {};
  float half_delta[kMqcMaxBits] = {};
  int64_t seed = 0;
};

// Weight bit-width i of candidate o as the CPU weight kernels take it (values read on the host).
struct MqcWeightQuant {
  int bits = 0;  // 0: full precision
  float scale = 1.f, inv_scale = 1.f, qmin = 0.f, qmax = 0.f;
  bool noise = false;             // noise mode: noisy[index in the kernel] instead of FQ
  float half_delta = 0.f;
  const float* noisy = nullptr;   // the noisy kernel (quant_noise's pass, stream mqc_weight_stream)
};

// One conv group's weight work for the CPU kernels (csrc/cpu/kernels/mixed_quant_conv.cpp).
struct MqcWeightJob {
  int64_t cin = 0, cout = 0, n_w = 0, n_a = 0;
  const float* probs = nullptr;          // [n_ops, n_w, n_a]
  const int64_t* xch = nullptr;          // [n_a * cin]: mqc_xq_channel(j, c)
  const MqcWeightQuant* quant = nullptr; // [n_ops * n_w]
  int64_t kh = 1, kw = 1, groups = 1;    // the group's window and channel groups
  int n_members = 0;
  struct Member {
    const float* w = nullptr;  // [cout, cin / groups, kh, kw] contiguous
    float* grad_w = nullptr;   // same (backward)
    int64_t o = 0, kh = 1, kw = 1, groups = 1, ratio = 1;
  } member[kMqcMaxOps];
  float* wg = nullptr;        // merged weight (forward) ...
  const float* gwg = nullptr; // ... or its gradient (backward)
  int64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0, ci_g = 0;  // its strides and channels per conv group
  double* part_p = nullptr;   // backward: [n_members * cout][n_w * n_a] partial sums of grad probs
  double* part_s = nullptr;   // backward: [n_members * cout][n_w] partial sums of grad w_scales
};

// ---------------------------------------------------------------------------------------------------------
// The split rule (host only). Cost of a conv group, in multiply-adds per output pixel:
//     Cout * (n_a * Cin / G) * KH * KW                      the convolution itself (dense within its G blocks)
//   + kMqcPassCost * (n_a * Cin + Cout)                     the passes one more convolution adds over xq and y
// (forward: read xq, accumulate y; backward: accumulate grad xq, read xq and grad y again: about four floats
// moved per channel, each worth ~16 multiply-adds at the vendor convolution's speed on a CPU or GPU).
// Greedy agglomeration: start with one group per candidate (its own D, G, window); repeatedly merge the pair
// of groups whose merge lowers the total cost most (ties: lowest indices); stop when no merge helps. A merged
// group takes D = gcd, G = gcd and the union of the members' windows in units of D.
// Embedding a candidate into a group whose window already covers it costs no multiply-adds (the group's dense
// window is there anyway), so a 1x1 or 3x3 beside a 5x5 always merges; splits happen for windows that do not
// nest (3x1 beside 1x3), for dilated beside undilated kernels, and for grouped kernels with no dense partner.
// ---------------------------------------------------------------------------------------------------------
constexpr double kMqcPassCost = 64.0;

struct MqcCandidate {
  int64_t kh, kw, groups, dilation;
};

struct MqcConvGroup {
  int64_t dilation = 1;   // D
  int64_t groups = 1;     // G
  int64_t kh = 1, kw = 1; // window in taps of D (odd)
  uint64_t members = 0;   // bit o set: candidate o is embedded here
};

struct MqcPlan {
  int n_groups = 0;
  MqcConvGroup group[kMqcMaxOps];
  int64_t channel_blocks = 1;  // G*: lcm of the groups' G
};

inline int64_t mqc_gcd(int64_t a, int64_t b) {
  while (b != 0) {
    int64_t t = a % b;
    a = b;
    b = t;
  }
  return a;
}

// Window extent, in taps of D, of candidate c inside a group of dilation D (D divides c.dilation).
inline void mqc_extent(const MqcCandidate& c, int64_t D, int64_t* eh, int64_t* ew) {
  const int64_t r = c.dilation / D;
  *eh = r * (c.kh - 1) + 1;
  *ew = r * (c.kw - 1) + 1;
}

inline double mqc_group_cost(const MqcConvGroup& g, int64_t cin, int64_t cout, int64_t n_a) {
  return static_cast<double>(cout) * static_cast<double>(n_a * cin / g.groups) * static_cast<double>(g.kh * g.kw) +
         kMqcPassCost * static_cast<double>(n_a * cin + cout);
}

inline MqcConvGroup mqc_merge(const MqcConvGroup& a, const MqcConvGroup& b, const MqcCandidate* cands, int n) {
  MqcConvGroup m;
  m.dilation = mqc_gcd(a.dilation, b.dilation);
  m.groups = mqc_gcd(a.groups, b.groups);
  m.members = a.members | b.members;
  m.kh = m.kw = 1;
  for (int o = 0; o < n; ++o) {
    if (!((m.members >> o) & 1u)) continue;
    int64_t eh, ew;
    mqc_extent(cands[o], m.dilation, &eh, &ew);
    if (eh > m.kh) m.kh = eh;
    if (ew > m.kw) m.kw = ew;
  }
  return m;
}

// mode: 0 = the rule above, 1 = everything in one group, 2 = one group per candidate (tests and benchmarks
// force 1 and 2 to check that every plan gives the same result).
inline MqcPlan mqc_plan(const MqcCandidate* cands, int n, int64_t cin, int64_t cout, int64_t n_a, int mode = 0) {
  MqcPlan p;
  p.n_groups = n;
  for (int o = 0; o < n; ++o) {
    MqcConvGroup& g = p.group[o];
    g.dilation = cands[o].dilation;
    g.groups = cands[o].groups;
    g.kh = cands[o].kh;
    g.kw = cands[o].kw;
    g.members = uint64_t{1} << o;
  }
  while (mode != 2 && p.n_groups > 1) {
    int best_a = -1, best_b = -1;
    double best_gain = 0.0;
    MqcConvGroup best;
    for (int a = 0; a < p.n_groups; ++a) {
      for (int b = a + 1; b < p.n_groups; ++b) {
        MqcConvGroup m = mqc_merge(p.group[a], p.group[b], cands, n);
        double gain = mqc_group_cost(p.group[a], cin, cout, n_a) + mqc_group_cost(p.group[b], cin, cout, n_a) -
                      mqc_group_cost(m, cin, cout, n_a);
        if (best_a < 0 ? (mode == 1 || gain > 0.0) : gain > best_gain) {
          best_a = a;
          best_b = b;
          best_gain = gain;
          best = m;
        }
      }
    }
    if (best_a < 0) break;
    p.group[best_a] = best;
    for (int k = best_b; k + 1 < p.n_groups; ++k) p.group[k] = p.group[k + 1];
    --p.n_groups;
  }
  int64_t l = 1;
  for (int g = 0; g < p.n_groups; ++g) l = l / mqc_gcd(l, p.group[g].groups) * p.group[g].groups;
  p.channel_blocks = l;
  return p;
}

// Where tap (th, tw) of candidate o lands in the window of its group: (row, col) of the merged kernel.
QOPS_HD void mqc_tap_position(int64_t th, int64_t tw, int64_t kh_o, int64_t kw_o, int64_t ratio, int64_t KH,
                              int64_t KW, int64_t* row, int64_t* col) {
  *row = (KH - 1) / 2 + ratio * (th - (kh_o - 1) / 2);
  *col = (KW - 1) / 2 + ratio * (tw - (kw_o - 1) / 2);
}

}  // namespace qops
