// CUDA kernels of torch.ops.qops.fake_quant / fake_quant_backward (LSQ fake quantization). Raw pointers and
// a stream only (no torch headers); the element math is csrc/include/qops/fake_quant_math.h, shared with the
// CPU kernels, so forward and grad_x equal the built-in bit for bit.
//
// - Loads and stores are 4-wide (float4 for float32, 8 bytes for float16/bfloat16) wherever the pointers are
//   aligned and the 4 elements share a channel (or are 4 consecutive channels); grid-stride loops.
// - Products that feed sums use __fmul_rn and the built-in's two FMAs are explicit fmaf, so nvcc's own
//   contraction cannot change the rounding.
// - The backward reduces in three layouts (one channel; channel-major for long rows; columns for short
//   rows, e.g. channels last): float per thread, folded into double every kFlushIters iterations, warp
//   shuffles and shared memory per block, one partial triple per block or column, then a second kernel
//   sums the partials of a channel in a fixed order. No atomics: results are run-to-run deterministic,
//   and the grids depend on the shape only.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "fake_quant.h"
#include "qops/fake_quant_math.h"

namespace qops::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMaxBlocks = 1024;  // enough resident threads for any current GPU; fixed for determinism
constexpr int kFlushIters = 64;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// VEC elements loaded / stored with one instruction when VEC = 4 (16 bytes for float, 8 for 16-bit types).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void load_pack(const T* p, float (&out)[VEC]) {
  const Pack<T, VEC> pack = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int l = 0; l < VEC; ++l) out[l] = to_float(pack.v[l]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* p, const float (&in)[VEC]) {
  Pack<T, VEC> pack;
#pragma unroll
  for (int l = 0; l < VEC; ++l) pack.v[l] = from_float<T>(in[l]);
  *reinterpret_cast<Pack<T, VEC>*>(p) = pack;
}

struct ChannelParams {
  float scale, inv_scale, zp_forward, zp_backward;
};

__device__ __forceinline__ ChannelParams load_params(const float* params, int64_t c) {
  const float4 v = __ldg(reinterpret_cast<const float4*>(params) + c);
  return {v.x, v.y, v.z, v.w};
}

// Channel of flat element e in [outer, channels, inner].
__device__ __forceinline__ int64_t channel_of(int64_t e, int64_t channels, int64_t inner) {
  return inner == 1 ? e % channels : (e / inner) % channels;
}

// ---- shared parameters ----

__global__ void prepare_params_kernel(const float* scale, const float* zero_point, int64_t channels,
                                      bool per_channel, int64_t quant_min, int64_t quant_max, float4* params) {
  for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < channels;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float s = scale[c];
    const float zp = zero_point[c];
    // A device-side check would need a host sync to report: a bad scale or a non-finite zero point gives NaN
    // outputs instead (the CPU raises).
    if (!(s > 0.f) || isinf(s) || isnan(zp) || isinf(zp)) s = __int_as_float(0x7fc00000);
    params[c] = make_float4(s, 1.0f / s, fq_zero_point_forward(zp, quant_min, quant_max),
                            fq_zero_point_backward_for(per_channel, zp, quant_min, quant_max));
  }
}

// ---- forward ----

// VEC = 4: every unit of 4 elements shares one channel (SHARED_CHANNEL) or has 4 consecutive ones (inner == 1).
template <typename T, int VEC, bool PER_CHANNEL>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t numel, int64_t channels, int64_t inner,
                   const float* __restrict__ params, float qmin, float qmax) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  ChannelParams pr = load_params(params, 0);
  const int64_t units = numel / VEC;
  for (int64_t u = first; u < units; u += stride) {
    const int64_t e0 = u * VEC;
    float v[VEC];
    load_pack<T, VEC>(x + e0, v);
#pragma unroll
    for (int l = 0; l < VEC; ++l) {
      if (PER_CHANNEL && (l == 0 || inner == 1)) pr = load_params(params, channel_of(e0 + l, channels, inner));
      v[l] = fq_forward(v[l], pr.scale, pr.inv_scale, pr.zp_forward, qmin, qmax);
    }
    store_pack<T, VEC>(y + e0, v);
  }
  for (int64_t e = units * VEC + first; e < numel; e += stride) {  // the last numel % VEC elements
    if (PER_CHANNEL) pr = load_params(params, channel_of(e, channels, inner));
    y[e] = from_float<T>(fq_forward(to_float(x[e]), pr.scale, pr.inv_scale, pr.zp_forward, qmin, qmax));
  }
}

// ---- backward: element, accumulators, block reduction ----

struct Sums {
  float inside = 0.f, below = 0.f, above = 0.f;  // float run, folded into the doubles every kFlushIters
  double d_inside = 0.0, d_below = 0.0, d_above = 0.0;
  int iters = 0;
  __device__ __forceinline__ void flush() {
    d_inside += inside;
    d_below += below;
    d_above += above;
    inside = below = above = 0.f;
    iters = 0;
  }
  __device__ __forceinline__ void tick() {
    if (++iters == kFlushIters) flush();
  }
};

// Returns grad_x; adds dy * fma(q - zp, s, -x) (inside), dy (below) or dy (above) to the sums.
__device__ __forceinline__ float backward_element(float x, float dy, const ChannelParams& pr, float qmin,
                                                  float qmax, Sums& sums) {
  const float q = fq_backward_q(x, pr.inv_scale, pr.zp_backward);
  const FqClass cls = fq_classify(q, qmin, qmax);
  if (cls == kFqInside) {
    sums.inside += __fmul_rn(dy, fmaf(q - pr.zp_backward, pr.scale, -x));
    return __fmul_rn(dy, 1.f);
  }
  if (cls == kFqBelow) {
    sums.below += dy;
  } else {
    sums.above += dy;
  }
  return __fmul_rn(dy, 0.f);  // -0.0 for a negative dy, as the built-in
}

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Sums three doubles over the block in a fixed order; the result is valid in thread 0. Every thread calls it.
__device__ void block_sum3(double (&v)[3]) {
  __shared__ double warp_sums[3][kWarps];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int k = 0; k < 3; ++k) v[k] = warp_sum(v[k]);
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < 3; ++k) warp_sums[k][warp] = v[k];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < 3; ++k) v[k] = warp_sum(lane < kWarps ? warp_sums[k][lane] : 0.0);
  }
  __syncthreads();  // warp_sums may be reused by the caller's next call
}

__device__ __forceinline__ void write_partial(double* partials, int64_t index, Sums& sums) {
  sums.flush();
  double v[3] = {sums.d_inside, sums.d_below, sums.d_above};
  block_sum3(v);
  if (threadIdx.x == 0) {
    partials[index * 3] = v[0];
    partials[index * 3 + 1] = v[1];
    partials[index * 3 + 2] = v[2];
  }
}

// One channel over all of memory: partial per block.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    backward_flat_kernel(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx, int64_t numel,
                         const float* __restrict__ params, float qmin, float qmax, double* __restrict__ partials) {
  const ChannelParams pr = load_params(params, 0);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t units = numel / VEC;
  Sums sums;
  for (int64_t u = first; u < units; u += stride) {
    float xv[VEC], dv[VEC];
    load_pack<T, VEC>(x + u * VEC, xv);
    load_pack<T, VEC>(dy + u * VEC, dv);
#pragma unroll
    for (int l = 0; l < VEC; ++l) dv[l] = backward_element(xv[l], dv[l], pr, qmin, qmax, sums);
    store_pack<T, VEC>(dx + u * VEC, dv);
    sums.tick();
  }
  for (int64_t e = units * VEC + first; e < numel; e += stride) {
    dx[e] = from_float<T>(backward_element(to_float(x[e]), to_float(dy[e]), pr, qmin, qmax, sums));
  }
  write_partial(partials, blockIdx.x, sums);
}

// Channel-major: block (split, channel) walks elements m = row * inner + column of its channel in
// [split * span, (split + 1) * span). VEC = 4 needs inner % 4 == 0 and span % 4 == 0.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    backward_channel_kernel(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx, int64_t outer,
                            int64_t channels, int64_t inner, int64_t span, const float* __restrict__ params,
                            float qmin, float qmax, double* __restrict__ partials) {
  const int64_t split = blockIdx.x, splits = gridDim.x;
  const int64_t count = outer * inner;
  const int64_t m_begin = split * span, m_end = m_begin + span < count ? m_begin + span : count;
  for (int64_t c = blockIdx.y; c < channels; c += gridDim.y) {
    const ChannelParams pr = load_params(params, c);
    Sums sums;
    for (int64_t m = m_begin + static_cast<int64_t>(threadIdx.x) * VEC; m < m_end;
         m += static_cast<int64_t>(blockDim.x) * VEC) {
      const int64_t row = m / inner;
      const int64_t e = (row * channels + c) * inner + (m - row * inner);
      float xv[VEC], dv[VEC];
      load_pack<T, VEC>(x + e, xv);
      load_pack<T, VEC>(dy + e, dv);
#pragma unroll
      for (int l = 0; l < VEC; ++l) dv[l] = backward_element(xv[l], dv[l], pr, qmin, qmax, sums);
      store_pack<T, VEC>(dx + e, dv);
      sums.tick();
    }
    write_partial(partials, c * splits + split, sums);
  }
}

// Columns (short rows, e.g. channels last): thread t owns column t of the rows [g * rows, ...) of
// group g = blockIdx.y; coalesced across threads; partial per (group, column).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    backward_column_kernel(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx, int64_t outer,
                           int64_t channels, int64_t inner, int64_t rows_per_group,
                           const float* __restrict__ params, float qmin, float qmax, double* __restrict__ partials) {
  const int64_t row_len = channels * inner;
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (t >= row_len) return;  // no block-wide reduction here
  const ChannelParams pr = load_params(params, t / inner);
  const int64_t g = blockIdx.y;
  const int64_t o_begin = g * rows_per_group;
  const int64_t o_end = o_begin + rows_per_group < outer ? o_begin + rows_per_group : outer;
  Sums sums;
  for (int64_t o = o_begin; o < o_end; ++o) {
    const int64_t e = o * row_len + t;
    dx[e] = from_float<T>(backward_element(to_float(x[e]), to_float(dy[e]), pr, qmin, qmax, sums));
    sums.tick();
  }
  sums.flush();
  const int64_t index = g * row_len + t;
  partials[index * 3] = sums.d_inside;
  partials[index * 3 + 1] = sums.d_below;
  partials[index * 3 + 2] = sums.d_above;
}

// Second stage: block per channel sums its `count` partials in a fixed order and forms the gradients.
// Partial j of channel c is at (c * count + j) (flat, channel-major) or, for columns, at
// ((j / inner) * channels * inner + c * inner + j % inner).
__global__ void __launch_bounds__(kThreads)
    finish_kernel(const double* __restrict__ partials, int64_t channels, int64_t count, bool columns,
                  int64_t inner, const float* __restrict__ params, float qmin, float qmax, float grad_factor,
                  float* __restrict__ grad_scale, float* __restrict__ grad_zero_point) {
  for (int64_t c = blockIdx.x; c < channels; c += gridDim.x) {
    double v[3] = {0.0, 0.0, 0.0};
    for (int64_t j = threadIdx.x; j < count; j += blockDim.x) {
      const int64_t index = columns ? (j / inner) * channels * inner + c * inner + j % inner : c * count + j;
      v[0] += partials[index * 3];
      v[1] += partials[index * 3 + 1];
      v[2] += partials[index * 3 + 2];
    }
    block_sum3(v);
    if (threadIdx.x == 0) {
      const ChannelParams pr = load_params(params, c);
      const double zp = pr.zp_backward, gf = grad_factor;
      const double dscale = (v[0] * static_cast<double>(pr.inv_scale) + v[1] * (static_cast<double>(qmin) - zp) +
                             v[2] * (static_cast<double>(qmax) - zp)) *
                            gf;
      grad_scale[c] = static_cast<float>(dscale);
      grad_zero_point[c] = static_cast<float>(-(v[1] + v[2]) * static_cast<double>(pr.scale) * gf);
    }
  }
}

// ---- host side ----

enum class BwdMode { kFlat, kChannel, kColumn };

struct BwdPlan {
  BwdMode mode;
  int64_t blocks = 1;          // flat
  int64_t splits = 1, span = 0;  // channel-major
  int64_t groups = 1, rows_per_group = 1;  // columns
  int64_t partial_count;       // partials per channel
  int64_t partial_entries;     // partial triples in all
};

BwdPlan plan_backward(const FqCudaProblem& p) {
  BwdPlan plan{};
  const int64_t numel = p.outer * p.channels * p.inner;
  if (p.channels == 1) {
    plan.mode = BwdMode::kFlat;
    plan.blocks = std::clamp<int64_t>(ceil_div(numel, kThreads * 16), 1, kMaxBlocks);
    plan.partial_count = plan.blocks;
    plan.partial_entries = plan.blocks;
  } else if (p.inner < 32 && p.outer >= 64) {
    plan.mode = BwdMode::kColumn;
    const int64_t row_len = p.channels * p.inner;
    plan.groups = std::clamp<int64_t>(ceil_div(kMaxBlocks, ceil_div(row_len, kThreads)), 1, ceil_div(p.outer, 16));
    plan.groups = std::min<int64_t>(plan.groups, 65535);
    plan.rows_per_group = ceil_div(p.outer, plan.groups);
    plan.groups = ceil_div(p.outer, plan.rows_per_group);
    plan.partial_count = plan.groups * p.inner;
    plan.partial_entries = plan.groups * row_len;
  } else {
    plan.mode = BwdMode::kChannel;
    const int64_t count = p.outer * p.inner;
    plan.splits = std::clamp<int64_t>(ceil_div(kMaxBlocks, p.channels), 1, ceil_div(count, kThreads * 4));
    plan.span = ceil_div(ceil_div(count, plan.splits), 4) * 4;
    plan.splits = ceil_div(count, plan.span);
    plan.partial_count = plan.splits;
    plan.partial_entries = p.channels * plan.splits;
  }
  return plan;
}

bool aligned(const void* ptr, int64_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

template <typename T>
cudaError_t launch_forward(const FqCudaProblem& p, const T* x, T* y, cudaStream_t stream) {
  const int64_t numel = p.outer * p.channels * p.inner;
  const bool per_channel = p.channels > 1;
  const bool vec = aligned(x, 4 * sizeof(T)) && aligned(y, 4 * sizeof(T)) &&
                   (!per_channel || p.inner == 1 || p.inner % 4 == 0);
  const int64_t units = vec ? numel / 4 : numel;
  const unsigned blocks = static_cast<unsigned>(std::clamp<int64_t>(ceil_div(units, kThreads), 1, 65535));
  const float qmin = p.quant_min, qmax = p.quant_max;
  if (vec && per_channel) {
    forward_kernel<T, 4, true><<<blocks, kThreads, 0, stream>>>(x, y, numel, p.channels, p.inner, p.params, qmin, qmax);
  } else if (vec) {
    forward_kernel<T, 4, false><<<blocks, kThreads, 0, stream>>>(x, y, numel, p.channels, p.inner, p.params, qmin, qmax);
  } else if (per_channel) {
    forward_kernel<T, 1, true><<<blocks, kThreads, 0, stream>>>(x, y, numel, p.channels, p.inner, p.params, qmin, qmax);
  } else {
    forward_kernel<T, 1, false><<<blocks, kThreads, 0, stream>>>(x, y, numel, p.channels, p.inner, p.params, qmin, qmax);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_backward(const FqCudaProblem& p, const T* dy, const T* x, T* dx, double* partials,
                            float grad_factor, float* grad_scale, float* grad_zero_point, cudaStream_t stream) {
  const BwdPlan plan = plan_backward(p);
  const int64_t numel = p.outer * p.channels * p.inner;
  const bool aligned4 = aligned(x, 4 * sizeof(T)) && aligned(dy, 4 * sizeof(T)) && aligned(dx, 4 * sizeof(T));
  const float qmin = p.quant_min, qmax = p.quant_max;
  switch (plan.mode) {
    case BwdMode::kFlat:
      if (aligned4) {
        backward_flat_kernel<T, 4><<<static_cast<unsigned>(plan.blocks), kThreads, 0, stream>>>(dy, x, dx, numel, p.params, qmin, qmax, partials);
      } else {
        backward_flat_kernel<T, 1><<<static_cast<unsigned>(plan.blocks), kThreads, 0, stream>>>(dy, x, dx, numel, p.params, qmin, qmax, partials);
      }
      break;
    case BwdMode::kChannel: {
      const dim3 grid(static_cast<unsigned>(plan.splits), static_cast<unsigned>(std::min<int64_t>(p.channels, 65535)));
      if (aligned4 && p.inner % 4 == 0) {
        backward_channel_kernel<T, 4><<<grid, kThreads, 0, stream>>>(dy, x, dx, p.outer, p.channels, p.inner, plan.span,
                                                                   p.params, qmin, qmax, partials);
      } else {
        backward_channel_kernel<T, 1><<<grid, kThreads, 0, stream>>>(dy, x, dx, p.outer, p.channels, p.inner, plan.span,
                                                                   p.params, qmin, qmax, partials);
      }
      break;
    }
    case BwdMode::kColumn: {
      const dim3 grid(static_cast<unsigned>(ceil_div(p.channels * p.inner, kThreads)), static_cast<unsigned>(plan.groups));
      backward_column_kernel<T><<<grid, kThreads, 0, stream>>>(dy, x, dx, p.outer, p.channels, p.inner,
                                                             plan.rows_per_group, p.params, qmin, qmax, partials);
      break;
    }
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const unsigned finish_blocks = static_cast<unsigned>(std::min<int64_t>(p.channels, 65535));
  finish_kernel<<<finish_blocks, kThreads, 0, stream>>>(partials, p.channels, plan.partial_count,
                                                       plan.mode == BwdMode::kColumn, p.inner, p.params, qmin, qmax,
                                                       grad_factor, grad_scale, grad_zero_point);
  return cudaGetLastError();
}

}  // namespace

cudaError_t fake_quant_prepare_params(const float* scale, const float* zero_point, int64_t channels,
                                      bool per_channel, int64_t quant_min, int64_t quant_max, float* params,
                                      cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>(std::clamp<int64_t>(ceil_div(channels, kThreads), 1, 1024));
  prepare_params_kernel<<<blocks, kThreads, 0, stream>>>(scale, zero_point, channels, per_channel, quant_min,
                                                         quant_max, reinterpret_cast<float4*>(params));
  return cudaGetLastError();
}

cudaError_t fake_quant_forward(const FqCudaProblem& p, const void* x, void* y, cudaStream_t stream) {
  switch (p.dtype) {
    case FqDtype::kHalf:
      return launch_forward(p, static_cast<const __half*>(x), static_cast<__half*>(y), stream);
    case FqDtype::kBFloat16:
      return launch_forward(p, static_cast<const __nv_bfloat16*>(x), static_cast<__nv_bfloat16*>(y), stream);
    default:
      return launch_forward(p, static_cast<const float*>(x), static_cast<float*>(y), stream);
  }
}

int64_t fake_quant_backward_workspace(const FqCudaProblem& p) { return plan_backward(p).partial_entries * 3; }

cudaError_t fake_quant_backward(const FqCudaProblem& p, const void* grad, const void* x, void* grad_x,
                                double* workspace, float grad_factor, float* grad_scale, float* grad_zero_point,
                                cudaStream_t stream) {
  switch (p.dtype) {
    case FqDtype::kHalf:
      return launch_backward(p, static_cast<const __half*>(grad), static_cast<const __half*>(x),
                             static_cast<__half*>(grad_x), workspace, grad_factor, grad_scale, grad_zero_point, stream);
    case FqDtype::kBFloat16:
      return launch_backward(p, static_cast<const __nv_bfloat16*>(grad), static_cast<const __nv_bfloat16*>(x),
                             static_cast<__nv_bfloat16*>(grad_x), workspace, grad_factor, grad_scale, grad_zero_point,
                             stream);
    default:
      return launch_backward(p, static_cast<const float*>(grad), static_cast<const float*>(x),
                             static_cast<float*>(grad_x), workspace, grad_factor, grad_scale, grad_zero_point, stream);
  }
}

}  // namespace qops::cuda
