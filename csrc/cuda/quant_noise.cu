// torch.ops.qops.quant_noise on CUDA, on raw pointers (see quant_noise.h):
//   1. range_partial: block (c, s) reduces split s of slice c to a partial (min, max);
//   2. half_deltas: one thread per slice folds its partials in a fixed order -> delta / 2;
//   3. noise: one thread per group of four elements (one Philox call, philox.h), y = x + h eps.
// Half types are read and written as such and computed in float32; float64 in float64 (with the
// float32 eps). All float operations are IEEE-rounded (philox.h's rules), so the result equals the
// CPU kernel's bit for bit.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "qops/philox.h"
#include "qops/quant_noise_math.h"
#include "quant_noise.h"

namespace qops::gpu {
namespace {

constexpr int kRangeThreads = 256;
constexpr int kNoiseThreads = 256;
constexpr int64_t kElemsPerSplit = 16384;
constexpr int64_t kMaxSplits = 1024;

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_acc(float v);
template <>
__device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
__device__ __forceinline__ double from_acc_d(double v) { return v; }

// NaN-propagating min/max (like torch.aminmax).
template <typename A>
__device__ __forceinline__ A min_nan(A a, A b) {
  return (a != a) ? a : ((b != b || b < a) ? b : a);
}
template <typename A>
__device__ __forceinline__ A max_nan(A a, A b) {
  return (a != a) ? a : ((b != b || b > a) ? b : a);
}

__device__ __forceinline__ float fma_acc(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ double fma_acc(double a, double b, double c) { return __fma_rn(a, b, c); }

template <typename A>
__device__ __forceinline__ A pos_inf();
template <>
__device__ __forceinline__ float pos_inf<float>() { return __int_as_float(0x7f800000); }
template <>
__device__ __forceinline__ double pos_inf<double>() { return __longlong_as_double(0x7ff0000000000000LL); }

// Block (c * nsplit + s): min/max of elements [s*chunk, (s+1)*chunk) of slice c, whose element j
// (of slab = outer*inner) is x[((j / inner) * channels + c) * inner + j % inner].
template <typename T>
__global__ void range_partial_kernel(const T* __restrict__ x, typename AccOf<T>::type* __restrict__ part_lo,
                                     typename AccOf<T>::type* __restrict__ part_hi, int64_t slab, int64_t channels,
                                     int64_t inner, int64_t chunk, int64_t nsplit) {
  using A = typename AccOf<T>::type;
  const int64_t c = blockIdx.x / nsplit;
  const int64_t s = blockIdx.x % nsplit;
  const int64_t begin = s * chunk;
  const int64_t end = begin + chunk < slab ? begin + chunk : slab;
  A lo = pos_inf<A>(), hi = -pos_inf<A>();
  if (inner == slab) {  // one contiguous run per slice (per tensor, or axis 0)
    const T* xs = x + c * inner;
    for (int64_t j = begin + threadIdx.x; j < end; j += blockDim.x) {
      const A v = to_acc(xs[j]);
      lo = min_nan(lo, v);
      hi = max_nan(hi, v);
    }
  } else {
    for (int64_t j = begin + threadIdx.x; j < end; j += blockDim.x) {
      const A v = to_acc(x[((j / inner) * channels + c) * inner + j % inner]);
      lo = min_nan(lo, v);
      hi = max_nan(hi, v);
    }
  }
  for (int offset = 16; offset > 0; offset >>= 1) {
    lo = min_nan(lo, __shfl_down_sync(0xffffffffu, lo, offset));
    hi = max_nan(hi, __shfl_down_sync(0xffffffffu, hi, offset));
  }
  __shared__ A warp_lo[kRangeThreads / 32], warp_hi[kRangeThreads / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    warp_lo[warp] = lo;
    warp_hi[warp] = hi;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kRangeThreads / 32; ++w) {
      lo = min_nan(lo, warp_lo[w]);
      hi = max_nan(hi, warp_hi[w]);
    }
    part_lo[blockIdx.x] = lo;
    part_hi[blockIdx.x] = hi;
  }
}

// Deterministic second stage: slice c folds its nsplit partials in order.
template <typename A>
__global__ void half_delta_kernel(const A* __restrict__ part_lo, const A* __restrict__ part_hi,
                                  A* __restrict__ half_delta, int64_t channels, int64_t nsplit, A levels) {
  const int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (c >= channels) return;
  A lo = part_lo[c * nsplit], hi = part_hi[c * nsplit];
  for (int64_t s = 1; s < nsplit; ++s) {
    lo = min_nan(lo, part_lo[c * nsplit + s]);
    hi = max_nan(hi, part_hi[c * nsplit + s]);
  }
  half_delta[c] = qops::quant_noise_half_delta(lo, hi, levels);
}

template <typename T>
__device__ __forceinline__ void store_acc(T* p, float v) {
  *p = from_acc<T>(v);
}
__device__ __forceinline__ void store_acc(double* p, double v) { *p = from_acc_d(v); }

// Thread per group g: elements 4g .. 4g+3 (logical row-major order of x).
template <typename T>
__global__ void noise_kernel(const T* __restrict__ x, T* __restrict__ y, const typename AccOf<T>::type* __restrict__ half_delta,
                             int64_t numel, int64_t channels, int64_t inner, int64_t seed, uint32_t stream_word, int dist) {
  using A = typename AccOf<T>::type;
  const int64_t groups = (numel + 3) / 4;
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < groups;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const Float4 eps = dist == static_cast<int>(NoiseDist::kGaussian)
                           ? philox_normal4(seed, stream_word, static_cast<uint64_t>(g))
                           : philox_uniform4(seed, stream_word, static_cast<uint64_t>(g));
    const int64_t first = 4 * g;
    int64_t c = channels == 1 ? 0 : (first / inner) % channels;
    int64_t pos = channels == 1 ? 0 : first % inner;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t i = first + j;
      if (i < numel) {
        const A h = half_delta[c];
        const A xv = to_acc(x[i]);
        store_acc(y + i, h == A(0) ? xv : fma_acc(h, static_cast<A>(eps.v[j]), xv));
      }
      if (channels != 1 && ++pos == inner) {
        pos = 0;
        if (++c == channels) c = 0;
      }
    }
  }
}

template <typename T>
cudaError_t launch(const void* xv, void* yv, int64_t outer, int64_t channels, int64_t inner, int64_t bits,
                   int64_t seed, uint32_t stream_word, int dist, void* workspace, int64_t nsplit, cudaStream_t stream) {
  using A = typename AccOf<T>::type;
  const T* x = static_cast<const T*>(xv);
  T* y = static_cast<T*>(yv);
  A* part_lo = static_cast<A*>(workspace);
  A* part_hi = part_lo + channels * nsplit;
  A* half_delta = part_hi + channels * nsplit;
  const int64_t slab = outer * inner;
  const int64_t chunk = (slab + nsplit - 1) / nsplit;
  range_partial_kernel<T><<<static_cast<unsigned>(channels * nsplit), kRangeThreads, 0, stream>>>(
      x, part_lo, part_hi, slab, channels, inner, chunk, nsplit);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const A levels = static_cast<A>((int64_t{1} << bits) - 1);
  half_delta_kernel<A><<<static_cast<unsigned>((channels + 127) / 128), 128, 0, stream>>>(part_lo, part_hi, half_delta,
                                                                                          channels, nsplit, levels);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int64_t numel = outer * channels * inner;
  const int64_t groups = (numel + 3) / 4;
  int64_t blocks = (groups + kNoiseThreads - 1) / kNoiseThreads;
  if (blocks > (int64_t{1} << 20)) blocks = int64_t{1} << 20;  // grid-stride beyond
  noise_kernel<T><<<static_cast<unsigned>(blocks), kNoiseThreads, 0, stream>>>(x, y, half_delta, numel, channels, inner,
                                                                               seed, stream_word, dist);
  return cudaGetLastError();
}

}  // namespace

int64_t quant_noise_num_splits(int64_t outer, int64_t channels, int64_t inner) {
  const int64_t slab = outer * inner;
  int64_t nsplit = (slab + kElemsPerSplit - 1) / kElemsPerSplit;
  // Enough blocks in total, but never more than 2^31 - 1 of them.
  const int64_t max_total = (int64_t{1} << 31) - 1;
  if (nsplit > kMaxSplits) nsplit = kMaxSplits;
  if (nsplit * channels > max_total) nsplit = max_total / channels;
  return nsplit < 1 ? 1 : nsplit;
}

size_t quant_noise_workspace_bytes(QuantNoiseDtype dtype, int64_t channels, int64_t nsplit) {
  const size_t acc = dtype == QuantNoiseDtype::kFloat64 ? sizeof(double) : sizeof(float);
  return acc * static_cast<size_t>(channels) * static_cast<size_t>(2 * nsplit + 1);
}

cudaError_t quant_noise_cuda(const void* x, void* y, QuantNoiseDtype dtype, int64_t outer, int64_t channels,
                             int64_t inner, int64_t bits, int64_t seed, uint32_t stream_word, int dist,
                             void* workspace, int64_t nsplit, cudaStream_t stream) {
  switch (dtype) {
    case QuantNoiseDtype::kFloat32:
      return launch<float>(x, y, outer, channels, inner, bits, seed, stream_word, dist, workspace, nsplit, stream);
    case QuantNoiseDtype::kFloat16:
      return launch<__half>(x, y, outer, channels, inner, bits, seed, stream_word, dist, workspace, nsplit, stream);
    case QuantNoiseDtype::kBFloat16:
      return launch<__nv_bfloat16>(x, y, outer, channels, inner, bits, seed, stream_word, dist, workspace, nsplit,
                                   stream);
    case QuantNoiseDtype::kFloat64:
      return launch<double>(x, y, outer, channels, inner, bits, seed, stream_word, dist, workspace, nsplit, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace qops::gpu
