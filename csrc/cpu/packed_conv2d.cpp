// torch.ops.qops.pack_weight / packed_conv2d / quantized_conv2d / requantized_conv2d on CPU: argument checks, the packing
// (csrc/include/qops/packed_layout.h), the choice of kernel path and registration. The convolution
// kernels are in csrc/cpu/kernels/packed_conv2d.cpp (per ISA).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "packed_conv2d.h"
#include "qops/checks.h"
#include "qops/packed_conv_args.h"
#include "qops/cpu_dispatch.h"
#include "qops/packed_layout.h"
#include "qops/parallel_grain.h"

namespace qops::cpu {
namespace {

// First code outside [lo, hi] in an int8 tensor, or none.
bool find_out_of_range(const at::Tensor& codes, int lo, int hi, int bits_is_one, int* bad) {
  const int8_t* c = codes.const_data_ptr<int8_t>();
  const int64_t n = codes.numel();
  for (int64_t i = 0; i < n; ++i) {
    const int v = c[i];
    if (v < lo || v > hi || (bits_is_one && v == 0)) {
      *bad = v;
      return true;
    }
  }
  return false;
}

at::Tensor pack_weight_cpu(const at::Tensor& w_codes, int64_t bits) {
  check_dtype(w_codes, at::kChar, "w_codes");
  check_dim(w_codes, 4, "w_codes");
  check_bits(bits, "bits");
  const at::Tensor w = w_codes.contiguous();
  const int b = static_cast<int>(bits);
  const int lo = packed_code_min(b), hi = packed_code_max(b);
  int bad = 0;
  TORCH_CHECK(!find_out_of_range(w, lo, hi, b == 1, &bad), "w_codes: codes must be in [", lo, ", ", hi, "]",
              b == 1 ? " and nonzero (1-bit codes are -1/+1)" : "", " for bits=", b, ", found ", bad);
  const int64_t Cout = w.size(0), K = w.numel() / std::max<int64_t>(Cout, 1);
  const int64_t KW = packed_plane_words(K);
  at::Tensor out = at::zeros({packed_weight_bytes(Cout, K, b)}, w.options().dtype(at::kByte));
  if (out.numel() == 0) return out;
  const int8_t* src = w.const_data_ptr<int8_t>();
  uint32_t* words = reinterpret_cast<uint32_t*>(out.mutable_data_ptr<uint8_t>());
  at::parallel_for(0, Cout, parallel_grain(K * b), [&](int64_t c0, int64_t c1) {
    for (int64_t co = c0; co < c1; ++co) {
      for (int64_t k = 0; k < K; ++k) {
        const uint32_t u = packed_pattern(src[co * K + k], b);
        for (int j = 0; j < b; ++j) words[(co * b + j) * KW + (k >> 5)] |= ((u >> j) & 1u) << (k & 31);
      }
    }
  });
  return out;
}

// QOPS_PACKED_PATH, read at every call so that tests can switch paths in one process.
PackedPath requested_path() {
  const char* env = std::getenv("QOPS_PACKED_PATH");
  if (env == nullptr || *env == '\0' || std::strcmp(env, "auto") == 0) return PackedPath::AUTO;
  if (std::strcmp(env, "scalar") == 0) return PackedPath::SCALAR;
  if (std::strcmp(env, "dot") == 0) return PackedPath::DOT;
  if (std::strcmp(env, "lut") == 0) return PackedPath::LUT;
  if (std::strcmp(env, "bitserial") == 0) return PackedPath::BITSERIAL;
  TORCH_CHECK(false, "QOPS_PACKED_PATH: unknown path '", env, "' (expected auto, scalar, dot, lut or bitserial)");
}

const char* path_name(PackedPath p) {
  switch (p) {
    case PackedPath::SCALAR: return "scalar";
    case PackedPath::DOT: return "dot";
    case PackedPath::LUT: return "lut";
    case PackedPath::BITSERIAL: return "bitserial";
    default: return "auto";
  }
}

// The path for this call: the forced one (which must be able to run it) or the fastest on this CPU.
PackedPath choose_path(int w_bits, int a_bits, bool a_signed) {
  const PackedPath want = requested_path();
  const bool vector = isa() != Isa::DEFAULT;
  if (want == PackedPath::AUTO) {
    if (!vector) return PackedPath::SCALAR;
    if (lut_supports(w_bits, a_bits, a_signed) && w_bits <= 2) return PackedPath::LUT;
    return PackedPath::DOT;
  }
  if (want != PackedPath::SCALAR) {
    TORCH_CHECK(vector, "QOPS_PACKED_PATH=", path_name(want), ": needs the AVX2 or AVX512 kernels, but the CPU ISA in use is ",
                isa_name(isa()));
  }
  if (want == PackedPath::LUT) {
    TORCH_CHECK(lut_supports(w_bits, a_bits, a_signed), "QOPS_PACKED_PATH=lut: the lookup-table path needs a_bits <= 2 "
                "and table entries within a byte; got w_bits=", w_bits, ", a_bits=", a_bits);
  }
  return want;
}

at::Tensor unpack_codes(const at::Tensor& w_packed, const ConvShape& s, int bits) {
  const int64_t K = s.Cin * s.KH * s.KW, KW = packed_plane_words(K);
  at::Tensor codes = at::empty({s.Cout, s.Cin, s.KH, s.KW}, w_packed.options().dtype(at::kChar));
  const at::Tensor buf = w_packed.contiguous();
  const uint32_t* words = reinterpret_cast<const uint32_t*>(buf.const_data_ptr<uint8_t>());
  int8_t* out = codes.mutable_data_ptr<int8_t>();
  at::parallel_for(0, s.Cout, parallel_grain(K * bits), [&](int64_t c0, int64_t c1) {
    std::vector<uint32_t> u(static_cast<size_t>(KW * 32));
    for (int64_t co = c0; co < c1; ++co) {
      // Gather the bit-planes word by word (vectorizable), then decode the patterns.
      std::fill(u.begin(), u.end(), 0u);
      for (int j = 0; j < bits; ++j) {
        const uint32_t* plane = words + (co * bits + j) * KW;
        for (int64_t q = 0; q < KW; ++q) {
          const uint32_t word = plane[q];
          uint32_t* uq = u.data() + q * 32;
          for (int rr = 0; rr < 32; ++rr) uq[rr] |= ((word >> rr) & 1u) << j;
        }
      }
      for (int64_t k = 0; k < K; ++k) out[co * K + k] = static_cast<int8_t>(packed_decode(u[static_cast<size_t>(k)], bits));
    }
  });
  return codes;
}

PackedConvParams make_params(const ConvShape& s, int64_t w_bits, int64_t a_bits, bool a_signed, const at::Tensor& codes) {
  PackedConvParams p;
  p.N = s.N;
  p.Cin = s.Cin;
  p.H = s.H;
  p.W = s.W;
  p.Cout = s.Cout;
  p.KH = s.KH;
  p.KW = s.KW;
  p.SH = s.SH;
  p.SW = s.SW;
  p.PH = s.PH;
  p.PW = s.PW;
  p.Ho = s.Ho;
  p.Wo = s.Wo;
  p.w_bits = static_cast<int>(w_bits);
  p.a_bits = static_cast<int>(a_bits);
  p.a_signed = a_signed;
  p.w_codes = codes.const_data_ptr<int8_t>();
  p.path = choose_path(p.w_bits, p.a_bits, a_signed);
  const CpuFeatures& f = cpu_features();
  // vpdpbusd in the dot path: AVX512-VNNI in the AVX512 build, AVX-VNNI (VEX) in the AVX2 build.
  p.use_vnni = p.path == PackedPath::DOT &&
               ((isa() == Isa::AVX512 && f.avx512vnni) || (isa() == Isa::AVX2 && f.avxvnni));
  p.use_vpopcntdq = isa() == Isa::AVX512 && f.avx512vpopcntdq;
  return p;
}

at::Tensor packed_conv2d_cpu(const at::Tensor& x_codes, const at::Tensor& w_packed, at::IntArrayRef w_shape,
                             int64_t w_bits, int64_t a_bits, bool a_signed, at::IntArrayRef stride,
                             at::IntArrayRef padding) {
  check_dtype(x_codes, a_signed ? at::kChar : at::kByte, "x_codes");
  const ConvShape s = check_conv(x_codes, "x_codes", w_packed, w_shape, w_bits, a_bits, stride, padding);
  const at::Tensor x = x_codes.contiguous();
  const at::Tensor codes = unpack_codes(w_packed, s, static_cast<int>(w_bits));
  at::Tensor out = at::empty({s.N, s.Cout, s.Ho, s.Wo}, x.options().dtype(at::kInt));
  if (out.numel() == 0) return out;
  PackedConvParams p = make_params(s, w_bits, a_bits, a_signed, codes);
  p.x_codes = static_cast<const uint8_t*>(x.const_data_ptr());
  p.out_i32 = out.mutable_data_ptr<int32_t>();
  const bool in_range = QOPS_CPU_DISPATCH(packed_conv2d_kernel, p);
  const int lo = a_signed ? -(1 << (a_bits - 1)) : 0, hi = a_signed ? (1 << (a_bits - 1)) - 1 : (1 << a_bits) - 1;
  TORCH_CHECK(in_range, "x_codes: codes must be in [", lo, ", ", hi, "] for a_bits=", a_bits,
              a_signed ? " (signed)" : " (unsigned)", "; found a value outside");
  return out;
}

// x of quantized_conv2d / requantized_conv2d: float32 (quantized in the kernel) or the activation codes
// themselves (int8 when a_signed, uint8 otherwise, range-checked in the kernel).
bool check_float_or_codes(const at::Tensor& x, bool a_signed) {
  const at::ScalarType codes = a_signed ? at::kChar : at::kByte;
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == codes, "x: expected dtype float32 or activation codes ",
              a_signed ? "int8 (a_signed)" : "uint8 (unsigned)", ", got ", x.scalar_type());
  return x.scalar_type() != at::kFloat;
}

// The float32 factors of the epilogue: out_scale[c] = w_scale[c] * a_scale, as the reference and the runtime
// form them.
std::vector<float> accumulator_steps(const ConvShape& s, const at::Tensor& w_scale, float a_scale_f) {
  const at::Tensor ws = w_scale.contiguous();
  std::vector<float> out_scale(static_cast<size_t>(s.Cout));
  for (int64_t c = 0; c < s.Cout; ++c) {
    const float sw = ws.const_data_ptr<float>()[ws.numel() == 1 ? 0 : c];
    TORCH_CHECK(sw > 0 && std::isfinite(sw), "w_scale: expected positive finite steps, got ", sw, " at index ", c);
    out_scale[static_cast<size_t>(c)] = sw * a_scale_f;
  }
  return out_scale;
}

// Runs the kernel on float x (quantized on load) or codes x; raises if codes were out of range.
void run_conv(PackedConvParams& p, const at::Tensor& xc, bool codes, float a_scale_f) {
  if (codes) {
    p.x_codes = static_cast<const uint8_t*>(xc.const_data_ptr());
  } else {
    p.x_float = xc.const_data_ptr<float>();
    p.a_inv_scale = 1.f / a_scale_f;  // as fake_quant: x * (1 / scale) in float32, then nearbyint
  }
  const bool in_range = QOPS_CPU_DISPATCH(packed_conv2d_kernel, p);
  const int a_bits = p.a_bits;
  const int lo = p.a_signed ? -(1 << (a_bits - 1)) : 0, hi = p.a_signed ? (1 << (a_bits - 1)) - 1 : (1 << a_bits) - 1;
  TORCH_CHECK(in_range, "x: codes must be in [", lo, ", ", hi, "] for a_bits=", a_bits,
              p.a_signed ? " (signed)" : " (unsigned)", "; found a value outside");
}

at::Tensor quantized_conv2d_cpu(const at::Tensor& x, const at::Tensor& w_packed, at::IntArrayRef w_shape,
                                const at::Tensor& w_scale, double a_scale, int64_t w_bits, int64_t a_bits, bool a_signed,
                                const std::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding) {
  const bool codes = check_float_or_codes(x, a_signed);
  const ConvShape s = check_conv(x, "x", w_packed, w_shape, w_bits, a_bits, stride, padding);
  check_scales_and_bias(x, s, w_scale, a_scale, bias, at::kFloat, "x");
  const float a_scale_f = static_cast<float>(a_scale);
  const at::Tensor bias_c = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  const std::vector<float> out_scale = accumulator_steps(s, w_scale, a_scale_f);
  const at::Tensor xc = x.contiguous();
  const at::Tensor wcodes = unpack_codes(w_packed, s, static_cast<int>(w_bits));
  at::Tensor out = at::empty({s.N, s.Cout, s.Ho, s.Wo}, xc.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  PackedConvParams p = make_params(s, w_bits, a_bits, a_signed, wcodes);
  p.out_f = out.mutable_data_ptr<float>();
  p.out_scale = out_scale.data();
  p.bias = bias_c.defined() ? bias_c.const_data_ptr<float>() : nullptr;
  run_conv(p, xc, codes, a_scale_f);
  return out;
}

at::Tensor requantized_conv2d_cpu(const at::Tensor& x, const at::Tensor& w_packed, at::IntArrayRef w_shape,
                                  const at::Tensor& w_scale, double a_scale, int64_t w_bits, int64_t a_bits,
                                  bool a_signed, const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                  at::IntArrayRef padding, double out_scale, int64_t out_bits, bool out_signed,
                                  bool relu, int64_t pixel_shuffle) {
  const bool codes = check_float_or_codes(x, a_signed);
  const ConvShape s = check_conv(x, "x", w_packed, w_shape, w_bits, a_bits, stride, padding);
  check_scales_and_bias(x, s, w_scale, a_scale, bias, at::kInt, "x");
  check_step(out_scale, "out_scale");
  check_bits(out_bits, "out_bits");
  const int64_t r = pixel_shuffle;
  TORCH_CHECK(r >= 1 && r <= 8 && s.Cout % (r * r) == 0, "pixel_shuffle: expected a factor in 1..8 whose square divides ",
              "the ", s.Cout, " output channels, got ", r);
  const float a_scale_f = static_cast<float>(a_scale);
  const std::vector<float> acc_step = accumulator_steps(s, w_scale, a_scale_f);
  // The int32 bias as a float at the accumulator's step: float(bias_q) * step in float32, the float bias
  // that quantized_conv2d receives from the packed runtime (qnas.deploy).
  std::vector<float> bias_f;
  if (bias.has_value() && bias->defined()) {
    const at::Tensor bc = bias->contiguous();
    bias_f.resize(static_cast<size_t>(s.Cout));
    for (int64_t c = 0; c < s.Cout; ++c)
      bias_f[static_cast<size_t>(c)] = static_cast<float>(bc.const_data_ptr<int32_t>()[c]) * acc_step[static_cast<size_t>(c)];
  }
  const at::Tensor xc = x.contiguous();
  const at::Tensor wcodes = unpack_codes(w_packed, s, static_cast<int>(w_bits));
  at::Tensor out = at::empty({s.N, s.Cout / (r * r), s.Ho * r, s.Wo * r},
                             xc.options().dtype(out_signed ? at::kChar : at::kByte));
  if (out.numel() == 0) return out;
  PackedConvParams p = make_params(s, w_bits, a_bits, a_signed, wcodes);
  p.out_codes = static_cast<uint8_t*>(out.mutable_data_ptr());
  p.out_shuffle = r;
  p.out_scale = acc_step.data();
  p.bias = bias_f.empty() ? nullptr : bias_f.data();
  p.out_inv_scale = 1.f / static_cast<float>(out_scale);
  p.out_lo = out_signed ? -(1 << (out_bits - 1)) : 0;
  p.out_hi = out_signed ? (1 << (out_bits - 1)) - 1 : (1 << out_bits) - 1;
  p.out_relu = relu;
  run_conv(p, xc, codes, a_scale_f);
  return out;
}

}  // namespace
}  // namespace qops::cpu

TORCH_LIBRARY_IMPL(qops, CPU, m) {
  m.impl("pack_weight", &qops::cpu::pack_weight_cpu);
  m.impl("packed_conv2d", &qops::cpu::packed_conv2d_cpu);
  m.impl("quantized_conv2d", &qops::cpu::quantized_conv2d_cpu);
  m.impl("requantized_conv2d", &qops::cpu::requantized_conv2d_cpu);
}
