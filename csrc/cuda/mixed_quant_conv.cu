// CUDA kernels of mixed_quant_conv: the same four small passes as the CPU (csrc/cpu/mixed_quant_conv.cpp)
// around cuDNN's convolution (called by the binding through ATen). Raw pointers, no torch headers.
//   act_forward:     one thread per xq element (channels-last, coalesced writes), reads x once per variant
//   act_backward:    one thread per x element; LSQ scale sums by warp shuffles + one atomic per warp
//   merge_weight:    one thread per merged-weight element, gathering its candidates (no atomics)
//   weight_backward: one thread per candidate-weight element; probs / w_scales sums by warp shuffles + atomics
#include <cuda_runtime.h>

#include <cstdint>

#include "mixed_quant_conv.h"
#include "qops/fake_quant_math.h"
#include "qops/mixed_quant_conv.h"

namespace qops::cuda {

namespace {

constexpr int kThreads = 256;

inline unsigned blocks_for(int64_t n) {
  int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(b < 1 ? 1 : (b > (int64_t{1} << 30) ? (int64_t{1} << 30) : b));
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// Value of x under activation variant j (quant mode).
__device__ __forceinline__ float act_value(const MqcCudaActs& v, int j, float xv) {
  if (v.bits[j] == 0) return xv;
  const float s = v.scales[j];
  return fq_forward(xv, s, 1.0f / s, 0.f, v.qmin[j], v.qmax[j]);
}

__global__ void act_forward_kernel(const float* __restrict__ x, bool channels_last, int64_t N, int64_t C, int64_t H,
                                   int64_t W, MqcCudaActs v, int64_t cb, float* __restrict__ xq) {
  const int64_t ctot = v.n * C, total = N * H * W * ctot;
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < total; e += int64_t{gridDim.x} * blockDim.x) {
    const int64_t k = e % ctot, p = e / ctot;  // xq channel, pixel (n, h, w)
    const int64_t blk = k / (v.n * cb), j = (k % (v.n * cb)) / cb, c = blk * cb + k % cb;
    const int64_t n = p / (H * W), hw = p % (H * W);
    const float xv = channels_last ? x[p * C + c] : x[(n * C + c) * H * W + hw];
    xq[e] = act_value(v, static_cast<int>(j), xv);
  }
}

__global__ void act_backward_kernel(const float* __restrict__ x, bool channels_last, int64_t N, int64_t C, int64_t H,
                                    int64_t W, MqcCudaActs v, int64_t cb, const float* __restrict__ gxq,
                                    float* __restrict__ gx, float* __restrict__ grad_scales) {
  const int64_t total = N * C * H * W, ctot = v.n * C;
  float acc[kMqcMaxBits];
  for (int j = 0; j < kMqcMaxBits; ++j) acc[j] = 0.f;
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < total; e += int64_t{gridDim.x} * blockDim.x) {
    int64_t p, c;  // pixel and channel of element e in x's layout
    if (channels_last) {
      c = e % C;
      p = e / C;
    } else {
      const int64_t hw = e % (H * W);
      c = (e / (H * W)) % C;
      p = (e / (C * H * W)) * H * W + hw;
    }
    const float xv = x[e];
    float g_sum = 0.f;
    for (int j = 0; j < v.n; ++j) {
      const float g = gxq[p * ctot + mqc_xq_channel(j, c, v.n, cb)];
      if (v.bits[j] == 0 || v.noise) {
        g_sum += g;
        continue;
      }
      const float s = v.scales[j];
      const FqGrad fg = fq_backward(xv, g, s, 1.0f / s, 0.f, v.qmin[j], v.qmax[j], 1.f);
      g_sum += fg.dx;
      acc[j] += fg.dscale;
    }
    gx[e] = g_sum;
  }
  for (int j = 0; j < v.n; ++j) {
    const float s = warp_sum(acc[j]);
    if ((threadIdx.x & 31) == 0 && v.bits[j] != 0 && !v.noise) atomicAdd(grad_scales + j, s);
  }
}

// Weight value of candidate m (row o of probs) at weight bit-width i.
__device__ __forceinline__ float weight_value(const MqcCudaWeights& p, int64_t o, int i, float wv) {
  if (p.bits[i] == 0) return wv;
  const float s = p.w_scales[o * p.n_w + i];
  return fq_forward(wv, s, 1.0f / s, 0.f, p.qmin[i], p.qmax[i]);
}

__global__ void merge_weight_kernel(MqcCudaWeights p, MqcCudaGroup g, float* __restrict__ wg) {
  const int64_t ci_g = p.n_a * p.cin / g.groups, cout_g = p.cout / g.groups;
  const int64_t total = p.cout * g.kh * g.kw * ci_g;
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < total; e += int64_t{gridDim.x} * blockDim.x) {
    // channels-last merged weight: e = ((co * KH + row) * KW + col) * ci_g + k
    const int64_t k = e % ci_g, col = (e / ci_g) % g.kw, row = (e / (ci_g * g.kw)) % g.kh, co = e / (ci_g * g.kw * g.kh);
    const int64_t ch = (co / cout_g) * ci_g + k;  // xq channel
    const int64_t blk = ch / (p.n_a * p.cb), j = (ch % (p.n_a * p.cb)) / p.cb, c = blk * p.cb + ch % p.cb;
    float acc = 0.f;
    for (int m = 0; m < g.n_members; ++m) {
      const MqcCudaCand& cand = g.member[m];
      const int64_t cin_o = p.cin / cand.groups, cout_o = p.cout / cand.groups;
      if (c / cin_o != co / cout_o) continue;  // outside co's block of this candidate
      const int64_t dr = row - (g.kh - 1) / 2, dc = col - (g.kw - 1) / 2;
      if (dr % cand.ratio != 0 || dc % cand.ratio != 0) continue;
      const int64_t th = dr / cand.ratio + (cand.kh - 1) / 2, tw = dc / cand.ratio + (cand.kw - 1) / 2;
      if (th < 0 || th >= cand.kh || tw < 0 || tw >= cand.kw) continue;
      const float wv = cand.w[((co * cin_o + (c - (co / cout_o) * cin_o)) * cand.kh + th) * cand.kw + tw];
      for (int i = 0; i < p.n_w; ++i)
        acc += p.probs[(cand.index * p.n_w + i) * p.n_a + j] * weight_value(p, cand.index, i, wv);
    }
    wg[e] = acc;
  }
}

// One thread per element of candidate m's weight; grid.y = member.
__global__ void weight_backward_kernel(MqcCudaWeights p, MqcCudaGroup g, const float* __restrict__ gwg,
                                       float* __restrict__ grad_probs, float* __restrict__ grad_w_scales) {
  const MqcCudaCand& cand = g.member[blockIdx.y];
  const int64_t o = cand.index;
  const int64_t cin_o = p.cin / cand.groups, cout_o = p.cout / cand.groups;
  const int64_t ci_g = p.n_a * p.cin / g.groups, cout_g = p.cout / g.groups;
  const int64_t total = p.cout * cin_o * cand.kh * cand.kw;
  float acc_p[kMqcMaxBits * kMqcMaxBits];
  float acc_s[kMqcMaxBits];
  for (int k = 0; k < p.n_w * p.n_a; ++k) acc_p[k] = 0.f;
  for (int i = 0; i < p.n_w; ++i) acc_s[i] = 0.f;
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < total; e += int64_t{gridDim.x} * blockDim.x) {
    const int64_t tw = e % cand.kw, th = (e / cand.kw) % cand.kh, cil = (e / (cand.kw * cand.kh)) % cin_o;
    const int64_t co = e / (cand.kw * cand.kh * cin_o);
    const int64_t c = (co / cout_o) * cin_o + cil, base = (co / cout_g) * ci_g;
    const int64_t row = (g.kh - 1) / 2 + cand.ratio * (th - (cand.kh - 1) / 2);
    const int64_t col = (g.kw - 1) / 2 + cand.ratio * (tw - (cand.kw - 1) / 2);
    const float* src = gwg + ((co * g.kh + row) * g.kw + col) * ci_g;
    float gs[kMqcMaxBits];
    for (int j = 0; j < p.n_a; ++j) gs[j] = src[mqc_xq_channel(j, c, p.n_a, p.cb) - base];
    const float wv = cand.w[e];
    float g_sum = 0.f;
    for (int i = 0; i < p.n_w; ++i) {
      const float qi = weight_value(p, o, i, wv);
      float gi = 0.f;
      for (int j = 0; j < p.n_a; ++j) {
        acc_p[i * p.n_a + j] += gs[j] * qi;
        gi += p.probs[(o * p.n_w + i) * p.n_a + j] * gs[j];
      }
      if (p.bits[i] == 0 || p.noise) {
        g_sum += gi;
      } else {
        const float s = p.w_scales[o * p.n_w + i];
        const FqGrad fg = fq_backward(wv, gi, s, 1.0f / s, 0.f, p.qmin[i], p.qmax[i], 1.f);
        g_sum += fg.dx;
        acc_s[i] += fg.dscale;
      }
    }
    cand.grad_w[e] = g_sum;
  }
  const bool lead = (threadIdx.x & 31) == 0;
  for (int k = 0; k < p.n_w * p.n_a; ++k) {
    const float s = warp_sum(acc_p[k]);
    if (lead) atomicAdd(grad_probs + o * p.n_w * p.n_a + k, s);
  }
  for (int i = 0; i < p.n_w; ++i) {
    const float s = warp_sum(acc_s[i]);
    if (lead && p.bits[i] != 0 && !p.noise) atomicAdd(grad_w_scales + o * p.n_w + i, s);
  }
}

}  // namespace

cudaError_t mqc_act_forward(const float* x, bool channels_last, int64_t N, int64_t C, int64_t H, int64_t W,
                            const MqcCudaActs& v, int64_t cb, float* xq, cudaStream_t stream) {
  const int64_t total = N * H * W * v.n * C;
  if (total == 0) return cudaSuccess;
  act_forward_kernel<<<blocks_for(total), kThreads, 0, stream>>>(x, channels_last, N, C, H, W, v, cb, xq);
  return cudaGetLastError();
}

cudaError_t mqc_act_backward(const float* x, bool channels_last, int64_t N, int64_t C, int64_t H, int64_t W,
                             const MqcCudaActs& v, int64_t cb, const float* gxq, float* gx, float* grad_scales,
                             cudaStream_t stream) {
  cudaError_t err = cudaMemsetAsync(grad_scales, 0, sizeof(float) * v.n, stream);
  if (err != cudaSuccess) return err;
  const int64_t total = N * C * H * W;
  if (total == 0) return cudaSuccess;
  // Grid-stride loop over a capped grid: fewer warps, fewer atomics.
  unsigned blocks = blocks_for(total);
  if (blocks > 4096) blocks = 4096;
  act_backward_kernel<<<blocks, kThreads, 0, stream>>>(x, channels_last, N, C, H, W, v, cb, gxq, gx, grad_scales);
  return cudaGetLastError();
}

cudaError_t mqc_merge_weight(const MqcCudaWeights& p, const MqcCudaGroup& g, float* wg, cudaStream_t stream) {
  const int64_t total = p.cout * g.kh * g.kw * (p.n_a * p.cin / g.groups);
  merge_weight_kernel<<<blocks_for(total), kThreads, 0, stream>>>(p, g, wg);
  return cudaGetLastError();
}

cudaError_t mqc_weight_backward(const MqcCudaWeights& p, const MqcCudaGroup& g, const float* gwg, float* grad_probs,
                                float* grad_w_scales, cudaStream_t stream) {
  int64_t largest = 1;
  for (int m = 0; m < g.n_members; ++m) {
    const MqcCudaCand& c = g.member[m];
    const int64_t n = p.cout * (p.cin / c.groups) * c.kh * c.kw;
    if (n > largest) largest = n;
  }
  unsigned bx = blocks_for(largest);
  if (bx > 1024) bx = 1024;
  const dim3 grid(bx, static_cast<unsigned>(g.n_members));
  weight_backward_kernel<<<grid, kThreads, 0, stream>>>(p, g, gwg, grad_probs, grad_w_scales);
  return cudaGetLastError();
}

}  // namespace qops::cuda
