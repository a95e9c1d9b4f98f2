// Launchers of the CUDA kernels of torch.ops.qops.pack_weight / packed_conv2d / quantized_conv2d
// (csrc/cuda/packed_conv2d.cu). Plain C++ on raw device pointers and a stream: no torch headers.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace qops::cuda {

struct PackedConvCudaArgs {
  // Input NCHW, contiguous: activation codes (uint8, or int8 when a_signed) or float32 quantized on the
  // fly as clamp(rint(x * a_inv_scale)) like fake_quant.
  const void* x = nullptr;
  bool x_is_float = false;
  float a_inv_scale = 1.f;
  int64_t N = 0, Cin = 0, H = 0, W = 0, Cout = 0, KH = 0, KW = 0, SH = 1, SW = 1, PH = 0, PW = 0, Ho = 0, Wo = 0;
  int w_bits = 8, a_bits = 8;
  bool a_signed = false;
  const uint32_t* w_words = nullptr;  // pack_weight buffer (csrc/include/qops/packed_layout.h)
  // Output NCHW: int32 (out_i32), or float out_f = acc * (w_scale[c] * a_scale) + bias[c].
  int32_t* out_i32 = nullptr;
  float* out_f = nullptr;
  const float* w_scale = nullptr;
  int64_t w_scale_numel = 1;
  float a_scale = 1.f;
  const float* bias = nullptr;
  int* bad_flag = nullptr;        // device int set to 1 if an x code is outside the activation range
  int8_t* w_scratch = nullptr;    // device buffer of packed_conv2d_scratch_bytes() for the dp4a path
};

// Whether packed_conv2d runs the 1-bit popcount kernel (w_bits == a_bits == 1) or the dp4a kernel.
inline bool packed_conv2d_uses_popcount(int w_bits, int a_bits) { return w_bits == 1 && a_bits == 1; }

// Bytes of the int8 weight codes the dp4a kernel unpacks per call: Cout rows of K rounded up to 32.
inline int64_t packed_conv2d_scratch_bytes(int64_t Cout, int64_t K) { return Cout * ((K + 31) / 32 * 32); }

// words[(co * bits + j) * KW + q] from int8 codes [Cout, K]; sets *bad_flag if a code is out of range.
cudaError_t launch_pack_weight(const int8_t* codes, uint32_t* words, int64_t Cout, int64_t K, int bits, int* bad_flag,
                               cudaStream_t stream);

cudaError_t launch_packed_conv2d(const PackedConvCudaArgs& a, cudaStream_t stream);

}  // namespace qops::cuda
