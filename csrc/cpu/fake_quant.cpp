// CPU entry points of torch.ops.qops.fake_quant / fake_quant_backward: argument checks, layout, the task
// grid, and the final combination of the backward's partial sums. Hot loops: csrc/cpu/kernels/fake_quant.cpp.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "kernels/fake_quant.h"
#include "qops/fake_quant_args.h"
#include "qops/fake_quant_math.h"

namespace qops::cpu {
namespace {

// The task grid aims at this many tasks (a fixed number: results must not depend on the thread count)
// and keeps at least this many elements per thread.
constexpr int64_t kTaskTarget = 64;
constexpr int64_t kMinElemsPerThread = int64_t{1} << 15;
constexpr int64_t kMinChunk = 4096;
constexpr int64_t kMaxTile = 1024;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

void plan_tasks(FqCpuProblem* p) {
  const int64_t numel = p->outer * p->channels * p->inner;
  p->row_mode = p->inner == 1 && p->channels > 1;
  if (p->row_mode) {
    // Lanes are 16 consecutive channels; a tile of channels keeps its float sums in L1.
    p->tile = std::min(ceil_div(p->channels, 16) * 16, kMaxTile);
    p->tiles = ceil_div(p->channels, p->tile);
    p->chunks = 1;
    p->chunk = 1;
    const int64_t groups = std::clamp<int64_t>(ceil_div(kTaskTarget, p->tiles), 1, p->outer);
    p->rows_per_group = ceil_div(p->outer, groups);
    p->groups = ceil_div(p->outer, p->rows_per_group);
    p->tasks = p->groups * p->tiles;
  } else {
    const int64_t segments = p->outer * p->channels;
    p->chunks = std::clamp<int64_t>(ceil_div(kTaskTarget, segments), 1, std::max<int64_t>(1, p->inner / kMinChunk));
    p->chunk = ceil_div(ceil_div(p->inner, p->chunks), 16) * 16;
    p->chunks = ceil_div(p->inner, p->chunk);
    const int64_t groups = std::clamp<int64_t>(ceil_div(kTaskTarget, p->channels * p->chunks), 1, p->outer);
    p->rows_per_group = ceil_div(p->outer, groups);
    p->groups = ceil_div(p->outer, p->rows_per_group);
    p->tasks = p->groups * p->channels * p->chunks;
  }
  const int64_t elems_per_task = std::max<int64_t>(1, numel / p->tasks);
  p->tasks_per_thread_min = std::max<int64_t>(1, kMinElemsPerThread / elems_per_task);
}

FqDtype dtype_of(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kHalf: return FqDtype::kHalf;
    case at::kBFloat16: return FqDtype::kBFloat16;
    default: return FqDtype::kFloat;
  }
}

// Per-channel scale, 1/scale and zero point (rounded for the pass) as float32 arrays.
struct ChannelParams {
  std::vector<float> scale, inv_scale, zero_point;
};

ChannelParams channel_params(const at::Tensor& scale, const at::Tensor& zero_point, bool per_channel,
                             bool backward, int64_t quant_min, int64_t quant_max) {
  const at::Tensor s = scale.detach().to(at::kFloat).contiguous();
  const at::Tensor z = zero_point.detach().to(at::kFloat).contiguous();
  const float* sp = s.const_data_ptr<float>();
  const float* zp = z.const_data_ptr<float>();
  const int64_t n = s.numel();
  ChannelParams out;
  out.scale.resize(n);
  out.inv_scale.resize(n);
  out.zero_point.resize(n);
  for (int64_t c = 0; c < n; ++c) {
    TORCH_CHECK(std::isfinite(sp[c]) && sp[c] > 0.f, "scale: expected positive finite values, got ", sp[c],
                " at index ", c);
    // As the built-in: NaN would silently become quant_min (fmax), +-inf the range's end.
    TORCH_CHECK(std::isfinite(zp[c]), "zero_point: expected finite values, got ", zp[c], " at index ", c);
    out.scale[c] = sp[c];
    out.inv_scale[c] = 1.0f / sp[c];
    out.zero_point[c] = backward ? fq_zero_point_backward_for(per_channel, zp[c], quant_min, quant_max)
                                 : fq_zero_point_forward(zp[c], quant_min, quant_max);
  }
  return out;
}

FqCpuProblem make_problem(const at::Tensor& dense_x, int64_t dim_axis, const ChannelParams& params,
                          int64_t quant_min, int64_t quant_max) {
  const FqLayout layout = fq_layout(dense_x, dim_axis);
  FqCpuProblem p{};
  p.dtype = dtype_of(dense_x);
  p.outer = layout.outer;
  p.channels = layout.channels;
  p.inner = layout.inner;
  p.scale = params.scale.data();
  p.inv_scale = params.inv_scale.data();
  p.zero_point = params.zero_point.data();
  p.quant_min = static_cast<float>(quant_min);
  p.quant_max = static_cast<float>(quant_max);
  plan_tasks(&p);
  return p;
}

at::Tensor fake_quant_cpu(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point, int64_t axis,
                          int64_t quant_min, int64_t quant_max, double grad_factor) {
  (void)grad_factor;  // scales gradients only
  const int64_t dim_axis = fq_check_args(x, scale, zero_point, axis, quant_min, quant_max);
  TORCH_CHECK(x.device().is_cpu(), "x: expected a CPU tensor, got ", x.device());
  const ChannelParams params = channel_params(scale, zero_point, dim_axis != -1, false, quant_min, quant_max);
  const at::Tensor dense_x = fq_dense(x);
  at::Tensor y = at::empty_like(dense_x);
  if (x.numel() == 0) return y;
  const FqCpuProblem p = make_problem(dense_x, dim_axis, params, quant_min, quant_max);
  QOPS_CPU_DISPATCH(fake_quant_forward_kernel, p, dense_x.const_data_ptr(), y.mutable_data_ptr());
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quant_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point, int64_t axis,
    int64_t quant_min, int64_t quant_max, double grad_factor) {
  const int64_t dim_axis = fq_check_args(x, scale, zero_point, axis, quant_min, quant_max);
  TORCH_CHECK(x.device().is_cpu(), "x: expected a CPU tensor, got ", x.device());
  fq_check_grad(grad, x);
  const bool per_channel = dim_axis != -1;
  const ChannelParams params = channel_params(scale, zero_point, per_channel, true, quant_min, quant_max);
  const at::Tensor dense_x = fq_dense(x);
  at::Tensor grad_x = at::empty_like(dense_x);
  const int64_t channels = scale.numel();
  at::Tensor grad_scale = at::empty(scale.sizes(), scale.options().dtype(at::kFloat));
  at::Tensor grad_zero_point = at::empty(zero_point.sizes(), zero_point.options().dtype(at::kFloat));
  float* gs = grad_scale.mutable_data_ptr<float>();
  float* gz = grad_zero_point.mutable_data_ptr<float>();
  std::fill(gs, gs + channels, 0.f);
  std::fill(gz, gz + channels, 0.f);
  if (x.numel() > 0) {
    const at::Tensor dense_grad = fq_in_layout_of(grad, dense_x);
    const FqCpuProblem p = make_problem(dense_x, dim_axis, params, quant_min, quant_max);
    std::vector<double> partials(fq_partials_size(p));
    QOPS_CPU_DISPATCH(fake_quant_backward_kernel, p, dense_grad.const_data_ptr(), dense_x.const_data_ptr(),
                      grad_x.mutable_data_ptr(), partials.data());
    // Per channel: the partial sums in a fixed order (group, then chunk), then the LSQ gradients in double:
    //   dscale = (S_inside / s + S_below * (qmin - zp) + S_above * (qmax - zp)) * gf, dzp = -(S_below + S_above) * s * gf
    // with 1/s and gf rounded to float as the built-in uses them. p.channels is 1 for one channel.
    const int64_t chunks = p.row_mode ? 1 : p.chunks;
    const double gf = static_cast<double>(static_cast<float>(grad_factor));
    for (int64_t c = 0; c < p.channels; ++c) {
      double sum_inside = 0.0, sum_below = 0.0, sum_above = 0.0;
      for (int64_t g = 0; g < p.groups; ++g) {
        for (int64_t k = 0; k < chunks; ++k) {
          const double* part = partials.data() + ((g * p.channels + c) * chunks + k) * 3;
          sum_inside += part[0];
          sum_below += part[1];
          sum_above += part[2];
        }
      }
      const double zp = params.zero_point[c];
      const double dscale = (sum_inside * static_cast<double>(params.inv_scale[c]) +
                             sum_below * (static_cast<double>(quant_min) - zp) +
                             sum_above * (static_cast<double>(quant_max) - zp)) *
                            gf;
      const double dzp = -(sum_below + sum_above) * static_cast<double>(params.scale[c]) * gf;
      gs[c] = static_cast<float>(dscale);
      gz[c] = static_cast<float>(dzp);
    }
  }
  return {grad_x, grad_scale.to(scale.scalar_type()), grad_zero_point.to(zero_point.scalar_type())};
}

}  // namespace
}  // namespace qops::cpu

TORCH_LIBRARY_IMPL(qops, CPU, m) {
  m.impl("fake_quant", &qops::cpu::fake_quant_cpu);
  m.impl("fake_quant_backward", &qops::cpu::fake_quant_backward_cpu);
}
