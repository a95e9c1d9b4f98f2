// CUDA kernels of torch.ops.qops.pack_weight / packed_conv2d / quantized_conv2d (no torch headers).
//
//   pack      one thread per 32-bit word of the bit-plane layout (csrc/include/qops/packed_layout.h).
//   dp4a      every bit pair: the weights are unpacked once per call to int8 codes [Cout][K rounded up to
//             32] (the packed buffer stays the one format on every device); an implicit GEMM tile of 64
//             output channels x 64 output pixels per block of 256 threads, 4x4 outputs per thread, 32 k
//             per shared-memory stage, the activation tile gathered (im2col on the fly, zero padding) into
//             dwords of 4 consecutive k. dp4a.u32.s32 (unsigned activation bytes) / dp4a.s32.s32 (signed)
//             multiply 4 byte pairs and accumulate exactly into int32.
//   popcount  1-bit weights and activations: sum x w = 2 popc(A & B) - popc(A) with A the activation bits
//             (x != 0) of 32 consecutive k, B the weight plane (w = 2 b - 1); negated for signed 1-bit
//             activations (x in {-1, 0}). One thread per output pixel, 32 output channels per block, the
//             weight words of the block in shared memory, 8 words (256 k) per stage.
// Float input (quantized_conv2d) is quantized while gathering: clamp(rint(x * inv_scale)), as fake_quant.
#include <cuda_runtime.h>

#include <cstdint>

#include "packed_conv2d.h"
#include "qops/packed_layout.h"

namespace qops::cuda {
namespace {

constexpr int kTileCo = 64, kTilePx = 64, kTileK = 32, kThreads = 256;
constexpr int kPopCo = 32, kPopPx = 128, kPopWords = 8;

// Activation code of (n, ci, iy, ix): 0 outside the image; flags codes outside [lo, hi].
__device__ __forceinline__ int load_act(const PackedConvCudaArgs& a, int64_t n, int64_t ci, int64_t iy, int64_t ix,
                                        int lo, int hi, bool* bad) {
  if (iy < 0 || iy >= a.H || ix < 0 || ix >= a.W) return 0;
  const int64_t idx = ((n * a.Cin + ci) * a.H + iy) * a.W + ix;
  if (a.x_is_float) {
    const float q = rintf(static_cast<const float*>(a.x)[idx] * a.a_inv_scale);
    return static_cast<int>(fminf(fmaxf(q, static_cast<float>(lo)), static_cast<float>(hi)));
  }
  const int v = a.a_signed ? static_cast<int>(static_cast<const int8_t*>(a.x)[idx])
                           : static_cast<int>(static_cast<const uint8_t*>(a.x)[idx]);
  if (v < lo || v > hi) *bad = true;
  return v;
}

__device__ __forceinline__ void store_out(const PackedConvCudaArgs& a, int64_t p, int64_t co, int acc) {
  const int64_t hw = a.Ho * a.Wo;
  const int64_t n = p / hw, r = p % hw;
  const int64_t idx = (n * a.Cout + co) * hw + r;
  if (a.out_i32 != nullptr) {
    a.out_i32[idx] = acc;
  } else {
    const float s = a.w_scale[a.w_scale_numel == 1 ? 0 : co] * a.a_scale;
    a.out_f[idx] = fmaf(static_cast<float>(acc), s, a.bias != nullptr ? a.bias[co] : 0.f);
  }
}

__global__ void pack_weight_kernel(const int8_t* codes, uint32_t* words, int64_t Cout, int64_t K, int bits,
                                   int* bad_flag) {
  const int64_t KW = packed_plane_words(K);
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= Cout * bits * KW) return;
  const int64_t q = t % KW, j = (t / KW) % bits, co = t / (KW * bits);
  const int lo = packed_code_min(bits), hi = packed_code_max(bits);
  uint32_t word = 0;
  for (int r = 0; r < 32; ++r) {
    const int64_t k = q * 32 + r;
    if (k >= K) break;
    const int c = codes[co * K + k];
    if (c < lo || c > hi || (bits == 1 && c == 0)) *bad_flag = 1;
    word |= ((packed_pattern(c, bits) >> j) & 1u) << r;
  }
  words[t] = word;
}

__global__ void unpack_weight_kernel(const uint32_t* words, int8_t* codes, int64_t Cout, int64_t K, int64_t Kp,
                                     int bits) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= Cout * Kp) return;
  const int64_t co = t / Kp, k = t % Kp;
  codes[t] = k < K ? static_cast<int8_t>(packed_code_at(words, co, k, bits, packed_plane_words(K))) : int8_t{0};
}

template <bool kSigned>
__device__ __forceinline__ int dp4a(uint32_t x, uint32_t w, int c) {
  int d;
  if constexpr (kSigned) {
    asm("dp4a.s32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(x), "r"(w), "r"(c));
  } else {
    asm("dp4a.u32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(x), "r"(w), "r"(c));
  }
  return d;
}

template <bool kSigned>
__global__ void __launch_bounds__(kThreads) conv_dp4a_kernel(PackedConvCudaArgs a, const int8_t* wcodes, int64_t Kp) {
  __shared__ uint32_t ws[kTileK / 4][kTileCo];
  __shared__ uint32_t xs[kTileK / 4][kTilePx];
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t P = a.N * a.Ho * a.Wo, K = a.Cin * a.KH * a.KW, khw = a.KH * a.KW;
  const int64_t px0 = static_cast<int64_t>(blockIdx.x) * kTilePx, co0 = static_cast<int64_t>(blockIdx.y) * kTileCo;
  const int lo = kSigned ? -(1 << (a.a_bits - 1)) : 0;
  const int hi = kSigned ? (1 << (a.a_bits - 1)) - 1 : (1 << a.a_bits) - 1;
  bool bad = false;
  int acc[4][4] = {};
  for (int64_t k0 = 0; k0 < Kp; k0 += kTileK) {
    for (int l = tid; l < (kTileK / 4) * kTileCo; l += kThreads) {
      const int kd = l / kTileCo, c = l % kTileCo;
      const int64_t co = co0 + c;
      ws[kd][c] = co < a.Cout ? *reinterpret_cast<const uint32_t*>(wcodes + co * Kp + k0 + kd * 4) : 0u;
      const int64_t p = px0 + c;
      uint32_t v = 0;
      if (p < P) {
        const int64_t n = p / (a.Ho * a.Wo), r = p % (a.Ho * a.Wo), oy = r / a.Wo, ox = r % a.Wo;
        for (int e = 0; e < 4; ++e) {
          const int64_t k = k0 + kd * 4 + e;
          if (k >= K) break;
          const int64_t ci = k / khw, t = k % khw;
          const int code = load_act(a, n, ci, oy * a.SH - a.PH + t / a.KW, ox * a.SW - a.PW + t % a.KW, lo, hi, &bad);
          v |= (static_cast<uint32_t>(code) & 0xffu) << (8 * e);
        }
      }
      xs[kd][c] = v;
    }
    __syncthreads();
#pragma unroll
    for (int kd = 0; kd < kTileK / 4; ++kd) {
      uint32_t w[4], x[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) w[i] = ws[kd][ty * 4 + i];
#pragma unroll
      for (int j = 0; j < 4; ++j) x[j] = xs[kd][tx * 4 + j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = dp4a<kSigned>(x[j], w[i], acc[i][j]);
    }
    __syncthreads();
  }
  if (bad && a.bad_flag != nullptr) *a.bad_flag = 1;
  for (int i = 0; i < 4; ++i) {
    const int64_t co = co0 + ty * 4 + i;
    if (co >= a.Cout) continue;
    for (int j = 0; j < 4; ++j) {
      const int64_t p = px0 + tx * 4 + j;
      if (p < P) store_out(a, p, co, acc[i][j]);
    }
  }
}

__global__ void __launch_bounds__(kPopPx) conv_popcount_kernel(PackedConvCudaArgs a) {
  __shared__ uint32_t ws[kPopCo][kPopWords];
  const int tid = threadIdx.x;
  const int64_t P = a.N * a.Ho * a.Wo, K = a.Cin * a.KH * a.KW, khw = a.KH * a.KW, KW = packed_plane_words(K);
  const int64_t p = static_cast<int64_t>(blockIdx.x) * kPopPx + tid, co0 = static_cast<int64_t>(blockIdx.y) * kPopCo;
  const bool active = p < P;
  const int64_t n = active ? p / (a.Ho * a.Wo) : 0, r = active ? p % (a.Ho * a.Wo) : 0;
  const int64_t oy = r / a.Wo, ox = r % a.Wo;
  const int lo = a.a_signed ? -1 : 0, hi = a.a_signed ? 0 : 1;
  bool bad = false;
  int acc[kPopCo] = {};
  int xcount = 0;
  for (int64_t q0 = 0; q0 < KW; q0 += kPopWords) {
    for (int l = tid; l < kPopCo * kPopWords; l += kPopPx) {
      const int c = l / kPopWords, qq = l % kPopWords;
      const int64_t co = co0 + c, q = q0 + qq;
      ws[c][qq] = (co < a.Cout && q < KW) ? a.w_words[co * KW + q] : 0u;  // plane 0 of a 1-bit row
    }
    __syncthreads();
    uint32_t xw[kPopWords];
#pragma unroll
    for (int qq = 0; qq < kPopWords; ++qq) {
      uint32_t word = 0;
      if (active) {
        for (int b = 0; b < 32; ++b) {
          const int64_t k = (q0 + qq) * 32 + b;
          if (k >= K) break;
          const int64_t ci = k / khw, t = k % khw;
          const int code = load_act(a, n, ci, oy * a.SH - a.PH + t / a.KW, ox * a.SW - a.PW + t % a.KW, lo, hi, &bad);
          word |= static_cast<uint32_t>(code != 0) << b;
        }
      }
      xw[qq] = word;
      xcount += __popc(word);
    }
#pragma unroll 4
    for (int c = 0; c < kPopCo; ++c) {
      int s = 0;
#pragma unroll
      for (int qq = 0; qq < kPopWords; ++qq) s += __popc(xw[qq] & ws[c][qq]);
      acc[c] += s;
    }
    __syncthreads();
  }
  if (bad && a.bad_flag != nullptr) *a.bad_flag = 1;
  if (!active) return;
  for (int c = 0; c < kPopCo; ++c) {
    const int64_t co = co0 + c;
    if (co >= a.Cout) break;
    const int v = 2 * acc[c] - xcount;  // sum over k of bit * (2 b - 1)
    store_out(a, p, co, a.a_signed ? -v : v);
  }
}

}  // namespace

cudaError_t launch_pack_weight(const int8_t* codes, uint32_t* words, int64_t Cout, int64_t K, int bits, int* bad_flag,
                               cudaStream_t stream) {
  const int64_t n = Cout * bits * packed_plane_words(K);
  if (n == 0) return cudaSuccess;
  pack_weight_kernel<<<static_cast<unsigned>((n + 255) / 256), 256, 0, stream>>>(codes, words, Cout, K, bits, bad_flag);
  return cudaGetLastError();
}

cudaError_t launch_packed_conv2d(const PackedConvCudaArgs& a, cudaStream_t stream) {
  const int64_t P = a.N * a.Ho * a.Wo, K = a.Cin * a.KH * a.KW;
  if (P == 0 || a.Cout == 0) return cudaSuccess;
  if (packed_conv2d_uses_popcount(a.w_bits, a.a_bits)) {
    const dim3 grid(static_cast<unsigned>((P + kPopPx - 1) / kPopPx), static_cast<unsigned>((a.Cout + kPopCo - 1) / kPopCo));
    conv_popcount_kernel<<<grid, kPopPx, 0, stream>>>(a);
    return cudaGetLastError();
  }
  const int64_t Kp = (K + 31) / 32 * 32;
  const int64_t nw = a.Cout * Kp;
  unpack_weight_kernel<<<static_cast<unsigned>((nw + 255) / 256), 256, 0, stream>>>(a.w_words, a.w_scratch, a.Cout, K,
                                                                                       Kp, a.w_bits);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>((P + kTilePx - 1) / kTilePx), static_cast<unsigned>((a.Cout + kTileCo - 1) / kTileCo));
  if (a.a_signed) {
    conv_dp4a_kernel<true><<<grid, kThreads, 0, stream>>>(a, a.w_scratch, Kp);
  } else {
    conv_dp4a_kernel<false><<<grid, kThreads, 0, stream>>>(a, a.w_scratch, Kp);
  }
  return cudaGetLastError();
}

}  // namespace qops::cuda
