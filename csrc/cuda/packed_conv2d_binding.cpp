// torch.ops.qops.pack_weight / packed_conv2d / quantized_conv2d on CUDA: the checks of
// qops/packed_conv_args.h, the current stream, and the launchers of csrc/cuda/packed_conv2d.cu.
// Code-range errors (w_codes, x_codes) are found by the kernels and read back once per call (one device
// sync); quantized_conv2d quantizes itself, needs no such check and never syncs (its w_scale values are
// not checked on CUDA for the same reason: qops.nn.PackedConv2d checks them when it is built).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "packed_conv2d.h"
#include "qops/checks.h"
#include "qops/packed_conv_args.h"
#include "qops/packed_layout.h"

namespace qops::cuda {
namespace {

PackedConvCudaArgs make_args(const ConvShape& s, int64_t w_bits, int64_t a_bits, bool a_signed, const at::Tensor& w_packed) {
  PackedConvCudaArgs a;
  a.N = s.N;
  a.Cin = s.Cin;
  a.H = s.H;
  a.W = s.W;
  a.Cout = s.Cout;
  a.KH = s.KH;
  a.KW = s.KW;
  a.SH = s.SH;
  a.SW = s.SW;
  a.PH = s.PH;
  a.PW = s.PW;
  a.Ho = s.Ho;
  a.Wo = s.Wo;
  a.w_bits = static_cast<int>(w_bits);
  a.a_bits = static_cast<int>(a_bits);
  a.a_signed = a_signed;
  a.w_words = reinterpret_cast<const uint32_t*>(w_packed.const_data_ptr<uint8_t>());
  return a;
}

at::Tensor scratch_for(const ConvShape& s, int64_t w_bits, int64_t a_bits, const at::Tensor& like) {
  const int64_t bytes = packed_conv2d_uses_popcount(static_cast<int>(w_bits), static_cast<int>(a_bits))
                            ? 0
                            : packed_conv2d_scratch_bytes(s.Cout, s.Cin * s.KH * s.KW);
  return at::empty({std::max<int64_t>(bytes, 1)}, like.options().dtype(at::kChar));
}

at::Tensor pack_weight_cuda(const at::Tensor& w_codes, int64_t bits) {
  check_dtype(w_codes, at::kChar, "w_codes");
  check_dim(w_codes, 4, "w_codes");
  check_bits(bits, "bits");
  const c10::cuda::CUDAGuard guard(w_codes.device());
  const at::Tensor w = w_codes.contiguous();
  const int64_t Cout = w.size(0), K = w.numel() / std::max<int64_t>(Cout, 1);
  at::Tensor out = at::empty({packed_weight_bytes(Cout, K, bits)}, w.options().dtype(at::kByte));
  if (out.numel() == 0) return out;
  at::Tensor bad = at::zeros({1}, w.options().dtype(at::kInt));
  C10_CUDA_CHECK(launch_pack_weight(w.const_data_ptr<int8_t>(), reinterpret_cast<uint32_t*>(out.mutable_data_ptr<uint8_t>()),
                                    Cout, K, static_cast<int>(bits), bad.mutable_data_ptr<int>(),
                                    c10::cuda::getCurrentCUDAStream()));
  const int b = static_cast<int>(bits);
  TORCH_CHECK(bad.item<int>() == 0, "w_codes: codes must be in [", packed_code_min(b), ", ", packed_code_max(b), "]",
              b == 1 ? " and nonzero (1-bit codes are -1/+1)" : "", " for bits=", b, "; found a code outside");
  return out;
}

at::Tensor packed_conv2d_cuda(const at::Tensor& x_codes, const at::Tensor& w_packed, at::IntArrayRef w_shape,
                              int64_t w_bits, int64_t a_bits, bool a_signed, at::IntArrayRef stride,
                              at::IntArrayRef padding) {
  check_dtype(x_codes, a_signed ? at::kChar : at::kByte, "x_codes");
  const ConvShape s = check_conv(x_codes, "x_codes", w_packed, w_shape, w_bits, a_bits, stride, padding);
  const c10::cuda::CUDAGuard guard(x_codes.device());
  const at::Tensor x = x_codes.contiguous(), wp = w_packed.contiguous();
  at::Tensor out = at::empty({s.N, s.Cout, s.Ho, s.Wo}, x.options().dtype(at::kInt));
  if (out.numel() == 0) return out;
  at::Tensor scratch = scratch_for(s, w_bits, a_bits, x);
  at::Tensor bad = at::zeros({1}, x.options().dtype(at::kInt));
  PackedConvCudaArgs a = make_args(s, w_bits, a_bits, a_signed, wp);
  a.x = x.const_data_ptr();
  a.out_i32 = out.mutable_data_ptr<int32_t>();
  a.bad_flag = bad.mutable_data_ptr<int>();
  a.w_scratch = scratch.mutable_data_ptr<int8_t>();
  C10_CUDA_CHECK(launch_packed_conv2d(a, c10::cuda::getCurrentCUDAStream()));
  const int lo = a_signed ? -(1 << (a_bits - 1)) : 0, hi = a_signed ? (1 << (a_bits - 1)) - 1 : (1 << a_bits) - 1;
  TORCH_CHECK(bad.item<int>() == 0, "x_codes: codes must be in [", lo, ", ", hi, "] for a_bits=", a_bits,
              a_signed ? " (signed)" : " (unsigned)", "; found a value outside");
  return out;
}

at::Tensor quantized_conv2d_cuda(const at::Tensor& x, const at::Tensor& w_packed, at::IntArrayRef w_shape,
                                 const at::Tensor& w_scale, double a_scale, int64_t w_bits, int64_t a_bits,
                                 bool a_signed, const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                 at::IntArrayRef padding) {
  check_dtype(x, at::kFloat, "x");
  const ConvShape s = check_conv(x, "x", w_packed, w_shape, w_bits, a_bits, stride, padding);
  check_quantized_args(x, s, w_scale, a_scale, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous(), wp = w_packed.contiguous(), ws = w_scale.contiguous();
  const at::Tensor bc = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  at::Tensor out = at::empty({s.N, s.Cout, s.Ho, s.Wo}, xc.options());
  if (out.numel() == 0) return out;
  at::Tensor scratch = scratch_for(s, w_bits, a_bits, xc);
  PackedConvCudaArgs a = make_args(s, w_bits, a_bits, a_signed, wp);
  const float a_scale_f = static_cast<float>(a_scale);
  a.x = xc.const_data_ptr();
  a.x_is_float = true;
  a.a_inv_scale = 1.f / a_scale_f;
  a.out_f = out.mutable_data_ptr<float>();
  a.w_scale = ws.const_data_ptr<float>();
  a.w_scale_numel = ws.numel();
  a.a_scale = a_scale_f;
  a.bias = bc.defined() ? bc.const_data_ptr<float>() : nullptr;
  a.w_scratch = scratch.mutable_data_ptr<int8_t>();
  C10_CUDA_CHECK(launch_packed_conv2d(a, c10::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace
}  // namespace qops::cuda

TORCH_LIBRARY_IMPL(qops, CUDA, m) {
  m.impl("pack_weight", &qops::cuda::pack_weight_cuda);
  m.impl("packed_conv2d", &qops::cuda::packed_conv2d_cuda);
  m.impl("quantized_conv2d", &qops::cuda::quantized_conv2d_cuda);
}
