// torch.ops.qops.pack_weight / packed_conv2d / quantized_conv2d on CPU: argument checks, the packing
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
#include "qops/cpu_dispatch.h"
#include "qops/packed_layout.h"

namespace qops::cpu {
namespace {

void check_bits(int64_t bits, const char* name) {
  TORCH_CHECK(bits >= 1 && bits <= 8, name, ": expected a bit-width in 1..8, got ", bits);
}

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
  // Small jobs run inline: a parallel region costs more than it saves below ~2^18 codes x bits.
  at::parallel_for(0, Cout, std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(K * b, 1)),
                   [&](int64_t c0, int64_t c1) {
    for (int64_t co = c0; co < c1; ++co) {
      for (int64_t k = 0; k < K; ++k) {
        const uint32_t u = packed_pattern(src[co * K + k], b);
        for (int j = 0; j < b; ++j) words[(co * b + j) * KW + (k >> 5)] |= ((u >> j) & 1u) << (k & 31);
      }
    }
  });
  return out;
}

struct ConvShape {
  int64_t N, Cin, H, W, Cout, KH, KW, SH, SW, PH, PW, Ho, Wo;
};

// Checks shared by packed_conv2d and quantized_conv2d; returns the geometry.
ConvShape check_conv(const at::Tensor& x, const char* x_name, const at::Tensor& w_packed, at::IntArrayRef w_shape,
                     int64_t w_bits, int64_t a_bits, at::IntArrayRef stride, at::IntArrayRef padding) {
  check_dim(x, 4, x_name);
  check_dtype(w_packed, at::kByte, "w_packed");
  check_dim(w_packed, 1, "w_packed");
  check_same_device(w_packed, x, "w_packed", x_name);
  check_bits(w_bits, "w_bits");
  check_bits(a_bits, "a_bits");
  TORCH_CHECK(w_shape.size() == 4, "w_shape: expected [Cout, Cin, kh, kw], got ", w_shape);
  for (int64_t v : w_shape) TORCH_CHECK(v > 0, "w_shape: expected positive sizes, got ", w_shape);
  TORCH_CHECK(stride.size() == 2, "stride: expected 2 values, got ", stride);
  TORCH_CHECK(padding.size() == 2, "padding: expected 2 values, got ", padding);
  TORCH_CHECK(stride[0] >= 1 && stride[1] >= 1, "stride: expected values >= 1, got ", stride);
  TORCH_CHECK(padding[0] >= 0 && padding[1] >= 0, "padding: expected values >= 0, got ", padding);
  ConvShape s;
  s.N = x.size(0);
  s.Cin = x.size(1);
  s.H = x.size(2);
  s.W = x.size(3);
  s.Cout = w_shape[0];
  s.KH = w_shape[2];
  s.KW = w_shape[3];
  s.SH = stride[0];
  s.SW = stride[1];
  s.PH = padding[0];
  s.PW = padding[1];
  TORCH_CHECK(w_shape[1] == s.Cin, "w_shape: Cin = ", w_shape[1], " does not match the ", s.Cin, " channels of ",
              x_name, " (shape ", x.sizes(), ")");
  const int64_t K = s.Cin * s.KH * s.KW;
  const int64_t want = packed_weight_bytes(s.Cout, K, w_bits);
  TORCH_CHECK(w_packed.numel() == want, "w_shape: ", w_shape, " at w_bits=", w_bits, " needs a packed buffer of ",
              want, " bytes, but w_packed has ", w_packed.numel(), " (was it packed with other bits or shape?)");
  const int64_t hp = s.H + 2 * s.PH, wp = s.W + 2 * s.PW;
  TORCH_CHECK(hp >= s.KH && wp >= s.KW, x_name, ": padded input ", hp, "x", wp, " is smaller than the kernel ", s.KH,
              "x", s.KW);
  s.Ho = (hp - s.KH) / s.SH + 1;
  s.Wo = (wp - s.KW) / s.SW + 1;
  // int32 accumulation is exact while K * max|x| * max|w| < 2^31.
  const double bound = static_cast<double>(K) * std::ldexp(1.0, static_cast<int>(a_bits)) *
                       std::ldexp(1.0, static_cast<int>(w_bits) - 1);
  TORCH_CHECK(bound < 2147483647.0, "w_shape: K = Cin*kh*kw = ", K, " is too large for exact int32 accumulation at ",
              w_bits, "x", a_bits, " bits");
  return s;
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
  at::parallel_for(0, s.Cout, std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(K * bits, 1)),
                   [&](int64_t c0, int64_t c1) {
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
  p.use_vnni = isa() == Isa::AVX512 && f.avx512vnni && p.path == PackedPath::DOT;
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

at::Tensor quantized_conv2d_cpu(const at::Tensor& x, const at::Tensor& w_packed, at::IntArrayRef w_shape,
                                const at::Tensor& w_scale, double a_scale, int64_t w_bits, int64_t a_bits, bool a_signed,
                                const std::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding) {
  check_dtype(x, at::kFloat, "x");
  const ConvShape s = check_conv(x, "x", w_packed, w_shape, w_bits, a_bits, stride, padding);
  check_dtype(w_scale, at::kFloat, "w_scale");
  check_same_device(w_scale, x, "w_scale", "x");
  TORCH_CHECK(w_scale.dim() <= 1 && (w_scale.numel() == s.Cout || w_scale.numel() == 1),
              "w_scale: expected shape [Cout] = [", s.Cout, "] or one element, got ", w_scale.sizes());
  TORCH_CHECK(std::isfinite(a_scale) && a_scale > 0, "a_scale: expected a positive finite step, got ", a_scale);
  const float a_scale_f = static_cast<float>(a_scale);
  TORCH_CHECK(a_scale_f > 0 && std::isfinite(1.f / a_scale_f), "a_scale: ", a_scale, " is not a usable float32 step");
  at::Tensor bias_c;
  if (bias.has_value() && bias->defined()) {
    check_dtype(*bias, at::kFloat, "bias");
    check_same_device(*bias, x, "bias", "x");
    TORCH_CHECK(bias->dim() == 1 && bias->numel() == s.Cout, "bias: expected shape [", s.Cout, "], got ",
                bias->sizes());
    bias_c = bias->contiguous();
  }
  const at::Tensor ws = w_scale.contiguous();
  std::vector<float> out_scale(static_cast<size_t>(s.Cout));
  for (int64_t c = 0; c < s.Cout; ++c) {
    const float sw = ws.const_data_ptr<float>()[ws.numel() == 1 ? 0 : c];
    TORCH_CHECK(sw > 0 && std::isfinite(sw), "w_scale: expected positive finite steps, got ", sw, " at index ", c);
    out_scale[static_cast<size_t>(c)] = sw * a_scale_f;
  }
  const at::Tensor xc = x.contiguous();
  const at::Tensor codes = unpack_codes(w_packed, s, static_cast<int>(w_bits));
  at::Tensor out = at::empty({s.N, s.Cout, s.Ho, s.Wo}, xc.options());
  if (out.numel() == 0) return out;
  PackedConvParams p = make_params(s, w_bits, a_bits, a_signed, codes);
  p.x_float = xc.const_data_ptr<float>();
  p.a_inv_scale = 1.f / a_scale_f;  // as fake_quant: x * (1 / scale) in float32, then nearbyint
  p.out_f = out.mutable_data_ptr<float>();
  p.out_scale = out_scale.data();
  p.bias = bias_c.defined() ? bias_c.const_data_ptr<float>() : nullptr;
  QOPS_CPU_DISPATCH(packed_conv2d_kernel, p);
  return out;
}

}  // namespace
}  // namespace qops::cpu

TORCH_LIBRARY_IMPL(qops, CPU, m) {
  m.impl("pack_weight", &qops::cpu::pack_weight_cpu);
  m.impl("packed_conv2d", &qops::cpu::packed_conv2d_cpu);
  m.impl("quantized_conv2d", &qops::cpu::quantized_conv2d_cpu);
}
