// mixed_quant_conv on the CPU: the CPU kernel wrappers (csrc/cpu/kernels/mixed_quant_conv.cpp, quant_noise's passes
// for noise mode) plugged into the shared orchestration of csrc/mixed_quant_conv_host.cpp, and the CPU registrations.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "qops/checks.h"
#include "qops/cpu_dispatch.h"
#include "qops/fake_quant_math.h"
#include "qops/mixed_quant_conv.h"
#include "qops/mixed_quant_conv_host.h"
#include "qops/parallel_grain.h"

QOPS_DECLARE_ISA_FN(void, mqc_act_forward,
                    (const float* x, bool channels_last, int64_t N, int64_t C, int64_t H, int64_t W,
                     const qops::MqcActVariants& v, int64_t cb, float* xq, bool xq_channels_last))
QOPS_DECLARE_ISA_FN(void, mqc_act_backward,
                    (const float* x, bool channels_last, int64_t N, int64_t C, int64_t H, int64_t W,
                     const qops::MqcActVariants& v, int64_t cb, const float* gxq, bool gxq_channels_last,
                     float* gx, double* unit_sums))
// quant_noise's per-ISA passes (csrc/cpu/kernels/quant_noise.cpp, declared as in csrc/cpu/quant_noise.cpp): noise
// mode draws its numbers through them, with the same (seed, stream, logical index) -> eps and fma as quant_noise.
QOPS_DECLARE_ISA_FN(void, quant_noise_range_float,
                    (const float* x, int64_t outer, int64_t channels, int64_t inner, float* lo, float* hi))
QOPS_DECLARE_ISA_FN(void, quant_noise_apply_float,
                    (const float* x, float* y, const float* half_delta, int64_t numel, int64_t channels,
                     int64_t inner, int64_t seed, uint32_t stream, int dist))
QOPS_DECLARE_ISA_FN(void, mqc_merge_weight_rows, (const qops::MqcWeightJob& job, int64_t co_begin, int64_t co_end))
QOPS_DECLARE_ISA_FN(void, mqc_weight_backward_units, (const qops::MqcWeightJob& job, int64_t u_begin, int64_t u_end))

// ---------------------------------------------------------------------------------------------------------
// CPU kernels
// ---------------------------------------------------------------------------------------------------------
namespace {

using qops::MqcActVariants;
using qops::mqc::Args;

MqcActVariants act_variants(const Args& a, const at::Tensor& x, const at::Tensor& a_scales) {
  MqcActVariants v;
  v.n = static_cast<int>(a.n_a);
  v.noise = a.noise;
  v.seed = a.seed;
  if (a.noise) {
    float lo = 0.f, hi = 0.f;
    if (x.numel() != 0) QOPS_CPU_DISPATCH(quant_noise_range_float, x.data_ptr<float>(), 1, 1, x.numel(), &lo, &hi);
    for (int j = 0; j < v.n; ++j) {
      v.bits[j] = static_cast<int>(a.a_bits[j]);
      if (v.bits[j] != 0) v.half_delta[j] = qops::mqc_half_delta(lo, hi, v.bits[j]);
    }
    return v;
  }
  const at::Tensor s = a_scales.contiguous();
  const float* sp = s.data_ptr<float>();
  for (int j = 0; j < v.n; ++j) {
    v.bits[j] = static_cast<int>(a.a_bits[j]);
    if (v.bits[j] == 0) continue;
    v.scale[j] = sp[j];
    v.inv_scale[j] = 1.0f / sp[j];
    qops::mqc_range(v.bits[j], a.a_signed, &v.qmin[j], &v.qmax[j]);
  }
  return v;
}

// Noise mode (x and xq NCHW): variant j is quant_noise's pass over all of x on stream 1 + j (its vectorized
// Philox), then copied into xq's channel blocks.
void cpu_act_forward_noise(const Args& a, const MqcActVariants& v, const at::Tensor& x, at::Tensor& xq) {
  TORCH_CHECK(x.is_contiguous() && xq.is_contiguous(), "mixed_quant_conv: noise mode expects NCHW x and xq");
  const int64_t numel = x.numel(), HW = a.H * a.W, ctot = a.n_a * a.cin, blocks = a.cin / a.cb;
  const float* xp = x.data_ptr<float>();
  float* out = xq.data_ptr<float>();
  at::Tensor tmp = at::empty({numel}, x.options());
  for (int64_t j = 0; j < a.n_a; ++j) {
    const float* src = xp;
    if (v.bits[j] != 0) {
      QOPS_CPU_DISPATCH(quant_noise_apply_float, xp, tmp.data_ptr<float>(), &v.half_delta[j], numel, 1, numel, v.seed,
                        qops::mqc_act_stream(j), static_cast<int>(qops::NoiseDist::kGaussian));
      src = tmp.data_ptr<float>();
    }
    at::parallel_for(0, a.N * blocks, qops::cpu::parallel_grain(a.cb * HW), [&](int64_t begin, int64_t end) {
      for (int64_t u = begin; u < end; ++u) {
        const int64_t n = u / blocks, b = u % blocks;
        const float* from = src + (n * a.cin + b * a.cb) * HW;
        std::copy(from, from + a.cb * HW, out + (n * ctot + b * a.n_a * a.cb + j * a.cb) * HW);
      }
    });
  }
}

void cpu_act_forward(const Args& a, const at::Tensor& x, const at::Tensor& a_scales, at::Tensor& xq) {
  const MqcActVariants v = act_variants(a, x, a_scales);
  if (x.numel() == 0) return;
  if (a.noise) return cpu_act_forward_noise(a, v, x, xq);
  QOPS_CPU_DISPATCH(mqc_act_forward, x.data_ptr<float>(), qops::mqc::is_nhwc(x), a.N, a.cin, a.H, a.W, v, a.cb,
                    xq.data_ptr<float>(), a.xq_channels_last);
}

void cpu_act_backward(const Args& a, const at::Tensor& x, const at::Tensor& a_scales, const at::Tensor& gxq,
                      at::Tensor& gx, at::Tensor& ga) {
  const MqcActVariants v = act_variants(a, x, a_scales);
  // One partial sum per work unit (image row or channel plane, whichever the kernel walks).
  const int64_t units = std::max(a.N * a.H, a.N * a.cin);
  std::vector<double> unit_sums(static_cast<size_t>(units * a.n_a), 0.0);
  // gxq comes channels-last from oneDNN/cuDNN, NCHW from NNPACK (a tensor that is both reads the same).
  const bool gxq_cl = !gxq.is_contiguous();
  if (x.numel() != 0) {
    QOPS_CPU_DISPATCH(mqc_act_backward, x.data_ptr<float>(), qops::mqc::is_nhwc(x), a.N, a.cin, a.H, a.W, v, a.cb,
                      gxq.data_ptr<float>(), gxq_cl, gx.data_ptr<float>(), unit_sums.data());
  }
  float* gap = ga.data_ptr<float>();
  for (int64_t j = 0; j < a.n_a; ++j) {
    double s = 0.0;
    for (int64_t r = 0; r < units; ++r) s += unit_sums[r * a.n_a + j];
    gap[j] = v.bits[j] == 0 || v.noise ? 0.f : static_cast<float>(s);
  }
}

// The weights at every bit-width; noise mode also fills `noisy` with each noisy candidate kernel (quant_noise's
// pass over it on stream mqc_weight_stream, so its logical indices are the kernel's own).
std::vector<qops::MqcWeightQuant> weight_quants(const Args& a, at::TensorList weights, const at::Tensor& w_scales,
                                                std::vector<at::Tensor>* noisy) {
  std::vector<qops::MqcWeightQuant> q(static_cast<size_t>(a.n_ops * a.n_w));
  if (a.noise) {
    for (int64_t o = 0; o < a.n_ops; ++o) {
      const at::Tensor w = weights[o].contiguous();
      float lo = 0.f, hi = 0.f;
      QOPS_CPU_DISPATCH(quant_noise_range_float, w.data_ptr<float>(), 1, 1, w.numel(), &lo, &hi);
      for (int64_t i = 0; i < a.n_w; ++i) {
        qops::MqcWeightQuant& e = q[o * a.n_w + i];
        e.bits = static_cast<int>(a.w_bits[i]);
        if (e.bits == 0) continue;
        e.noise = true;
        e.half_delta = qops::mqc_half_delta(lo, hi, e.bits);
        at::Tensor buf = at::empty_like(w);
        QOPS_CPU_DISPATCH(quant_noise_apply_float, w.data_ptr<float>(), buf.data_ptr<float>(), &e.half_delta,
                          w.numel(), 1, w.numel(), a.seed, qops::mqc_weight_stream(a.n_a, a.n_w, o, i),
                          static_cast<int>(qops::NoiseDist::kGaussian));
        e.noisy = buf.data_ptr<float>();
        noisy->push_back(buf);
      }
    }
    return q;
  }
  const at::Tensor s = w_scales.contiguous();
  const float* sp = s.data_ptr<float>();
  for (int64_t o = 0; o < a.n_ops; ++o) {
    for (int64_t i = 0; i < a.n_w; ++i) {
      qops::MqcWeightQuant& e = q[o * a.n_w + i];
      e.bits = static_cast<int>(a.w_bits[i]);
      if (e.bits == 0) continue;
      e.scale = sp[o * a.n_w + i];
      e.inv_scale = 1.0f / e.scale;
      qops::mqc_range(e.bits, true, &e.qmin, &e.qmax);
    }
  }
  return q;
}

// xq channel of (j, c) for every variant and input channel, so the weight loops do no divisions.
std::vector<int64_t> xq_channels(const Args& a) {
  std::vector<int64_t> t(static_cast<size_t>(a.n_a * a.cin));
  for (int64_t j = 0; j < a.n_a; ++j)
    for (int64_t c = 0; c < a.cin; ++c) t[j * a.cin + c] = qops::mqc_xq_channel(j, c, a.n_a, a.cb);
  return t;
}

// Everything the weight kernels need for conv group g; `keep` holds the tensors the pointers point into.
struct WeightJob {
  qops::MqcWeightJob job;
  std::vector<qops::MqcWeightQuant> quant;
  std::vector<int64_t> xch;
  std::vector<at::Tensor> keep;
  int64_t row_work = 0;  // multiply-adds per output channel
};

void init_job(WeightJob& wj, const Args& a, int g, at::TensorList weights, const at::Tensor& probs,
              const at::Tensor& w_scales) {
  const qops::MqcConvGroup& grp = a.plan.group[g];
  qops::MqcWeightJob& job = wj.job;
  wj.quant = weight_quants(a, weights, w_scales, &wj.keep);
  wj.xch = xq_channels(a);
  wj.keep.push_back(probs.contiguous());
  job.cin = a.cin;
  job.cout = a.cout;
  job.n_w = a.n_w;
  job.n_a = a.n_a;
  job.probs = wj.keep.back().data_ptr<float>();
  job.xch = wj.xch.data();
  job.quant = wj.quant.data();
  job.kh = grp.kh;
  job.kw = grp.kw;
  job.groups = grp.groups;
  job.ci_g = a.n_a * a.cin / grp.groups;
  for (int64_t o = 0; o < a.n_ops; ++o) {
    if (!((grp.members >> o) & 1u)) continue;
    wj.keep.push_back(weights[o].contiguous());
    qops::MqcWeightJob::Member& m = job.member[job.n_members++];
    const qops::MqcCandidate& c = a.cands[o];
    m.w = wj.keep.back().data_ptr<float>();
    m.o = o;
    m.kh = c.kh;
    m.kw = c.kw;
    m.groups = c.groups;
    m.ratio = c.dilation / grp.dilation;
    wj.row_work += a.cin / c.groups * c.kh * c.kw * a.n_w * a.n_a;
  }
}

void set_strides(qops::MqcWeightJob& job, const at::Tensor& t) {
  job.s0 = t.stride(0);
  job.s1 = t.stride(1);
  job.s2 = t.stride(2);
  job.s3 = t.stride(3);
}

void cpu_merge_weight(const Args& a, int g, at::TensorList weights, const at::Tensor& probs,
                      const at::Tensor& w_scales, at::Tensor& wg) {
  WeightJob wj;
  init_job(wj, a, g, weights, probs, w_scales);
  wj.job.wg = wg.data_ptr<float>();
  set_strides(wj.job, wg);
  // One output channel per task: every write of a task lands in its own row of wg.
  at::parallel_for(0, a.cout, qops::cpu::parallel_grain(wj.row_work), [&](int64_t begin, int64_t end) {
    QOPS_CPU_DISPATCH(mqc_merge_weight_rows, wj.job, begin, end);
  });
}

void cpu_weight_backward(const Args& a, const std::vector<at::Tensor>& gw, at::TensorList weights,
                         const at::Tensor& probs, const at::Tensor& w_scales, std::vector<at::Tensor>& grad_weights,
                         at::Tensor& grad_probs, at::Tensor& grad_w_scales) {
  const int64_t n_w = a.n_w, n_a = a.n_a;
  std::vector<double> sum_p(static_cast<size_t>(a.n_ops * n_w * n_a), 0.0), sum_s(static_cast<size_t>(a.n_ops * n_w), 0.0);
  for (int g = 0; g < a.plan.n_groups; ++g) {
    WeightJob wj;
    init_job(wj, a, g, weights, probs, w_scales);
    qops::MqcWeightJob& job = wj.job;
    const at::Tensor gwg = gw[g];
    job.gwg = gwg.data_ptr<float>();
    set_strides(job, gwg);
    for (int m = 0; m < job.n_members; ++m) job.member[m].grad_w = grad_weights[job.member[m].o].data_ptr<float>();
    // One task per (member, output channel) with its own partial sums: deterministic for any thread count.
    const int64_t units = job.n_members * a.cout;
    std::vector<double> part_p(static_cast<size_t>(units * n_w * n_a), 0.0), part_s(static_cast<size_t>(units * n_w), 0.0);
    job.part_p = part_p.data();
    job.part_s = part_s.data();
    const int64_t unit_work = std::max<int64_t>(1, wj.row_work / std::max(job.n_members, 1));
    at::parallel_for(0, units, qops::cpu::parallel_grain(unit_work), [&](int64_t begin, int64_t end) {
      QOPS_CPU_DISPATCH(mqc_weight_backward_units, job, begin, end);
    });
    for (int m = 0; m < job.n_members; ++m) {
      const int64_t o = job.member[m].o;
      for (int64_t co = 0; co < a.cout; ++co) {
        const int64_t u = m * a.cout + co;
        for (int64_t k = 0; k < n_w * n_a; ++k) sum_p[o * n_w * n_a + k] += part_p[u * n_w * n_a + k];
        for (int64_t i = 0; i < n_w; ++i) sum_s[o * n_w + i] += part_s[u * n_w + i];
      }
    }
  }
  float* gpo = grad_probs.data_ptr<float>();
  float* gso = grad_w_scales.data_ptr<float>();
  for (int64_t k = 0; k < a.n_ops * n_w * n_a; ++k) gpo[k] = static_cast<float>(sum_p[k]);
  for (int64_t k = 0; k < a.n_ops * n_w; ++k)
    gso[k] = a.w_bits[k % n_w] == 0 || a.noise ? 0.f : static_cast<float>(sum_s[k]);
}

const qops::mqc::Kernels kCpuKernels{cpu_act_forward, cpu_merge_weight, cpu_act_backward, cpu_weight_backward};

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got ", t.device());
}

at::Tensor mixed_quant_conv_cpu(const at::Tensor& x, at::TensorList weights, const at::Tensor& probs,
                                at::IntArrayRef w_bits, at::IntArrayRef a_bits, const at::Tensor& w_scales,
                                const at::Tensor& a_scales, bool a_signed, at::IntArrayRef groups,
                                at::IntArrayRef dilations, int64_t stride, const std::optional<at::Tensor>& bias,
                                c10::string_view mode, int64_t seed) {
  check_cpu(x, "x");
  const Args a = qops::mqc::check_args(x, weights, probs, w_bits, a_bits, w_scales, a_scales, a_signed, groups,
                                       dilations, stride, bias.has_value(), std::string_view(mode.data(), mode.size()),
                                       seed, true);
  return qops::mqc::forward(a, kCpuKernels, x, weights, probs, w_scales, a_scales, bias);
}

std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
mixed_quant_conv_backward_cpu(const at::Tensor& grad, const at::Tensor& x, at::TensorList weights,
                              const at::Tensor& probs, at::IntArrayRef w_bits, at::IntArrayRef a_bits,
                              const at::Tensor& w_scales, const at::Tensor& a_scales, bool a_signed,
                              at::IntArrayRef groups, at::IntArrayRef dilations, int64_t stride, bool has_bias,
                              c10::string_view mode, int64_t seed, std::array<bool, 6> output_mask) {
  check_cpu(x, "x");
  const Args a = qops::mqc::check_args(x, weights, probs, w_bits, a_bits, w_scales, a_scales, a_signed, groups,
                                       dilations, stride, has_bias, std::string_view(mode.data(), mode.size()), seed,
                                       true);
  qops::check_dtype(grad, at::kFloat, "grad");
  qops::check_same_device(grad, x, "grad", "x");
  TORCH_CHECK(grad.sizes() == at::IntArrayRef({a.N, a.cout, a.Ho, a.Wo}), "grad: expected the output's shape [",
              a.N, ", ", a.cout, ", ", a.Ho, ", ", a.Wo, "], got ", grad.sizes());
  return qops::mqc::backward(a, kCpuKernels, grad, x, weights, probs, w_scales, a_scales, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(qops, CPU, m) {
  m.impl("mixed_quant_conv", &mixed_quant_conv_cpu);
  m.impl("mixed_quant_conv_backward", &mixed_quant_conv_backward_cpu);
}
