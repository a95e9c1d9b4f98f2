// Hot loops of torch.ops.qops.requantize / quantized_add on CPU, compiled once per ISA (setup.py): the
// element-wise steps of the packed runtime's integer pipeline (csrc/cpu/packed_codes.h). The AVX2 loop and
// the scalar one compute the same float32 operations (one rounding each), so every ISA gives the same codes.
#include <cmath>
#include <cstdint>

#include "../packed_codes.h"

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#define QOPS_CODES_AVX2 1
#endif
// GCC 12 flags _mm512_undefined_*() inside its own AVX-512 intrinsics as "may be used uninitialized".
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// The float pipeline rounds each product and the sum separately: no fused multiply-adds here (GCC contracts
// a * b + c, intrinsics included, unless told not to).
#pragma GCC optimize("fp-contract=off")

namespace qops::cpu::CPU_CAPABILITY {

namespace {

inline float value_at(const CodesOperand& a, int64_t i) {
  if (a.f != nullptr) return a.f[i];
  const int c = a.is_signed ? static_cast<const int8_t*>(a.codes)[i] : static_cast<const uint8_t*>(a.codes)[i];
  return static_cast<float>(c) * a.scale;
}

#if defined(CPU_CAPABILITY_AVX512)
// Sixteen values of operand a from element i.
inline __m512 values16(const CodesOperand& a, int64_t i) {
  if (a.f != nullptr) return _mm512_loadu_ps(a.f + i);
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint8_t*>(a.codes) + i));
  const __m512i c = a.is_signed ? _mm512_cvtepi8_epi32(b) : _mm512_cvtepu8_epi32(b);
  return _mm512_mul_ps(_mm512_cvtepi32_ps(c), _mm512_set1_ps(a.scale));
}
#endif

#if defined(QOPS_CODES_AVX2)
// Eight values of operand a from element i.
inline __m256 values8(const CodesOperand& a, int64_t i) {
  if (a.f != nullptr) return _mm256_loadu_ps(a.f + i);
  const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(static_cast<const uint8_t*>(a.codes) + i));
  const __m256i c = a.is_signed ? _mm256_cvtepi8_epi32(b) : _mm256_cvtepu8_epi32(b);
  return _mm256_mul_ps(_mm256_cvtepi32_ps(c), _mm256_set1_ps(a.scale));
}
#endif

}  // namespace

void requantize_kernel(const CodesParams& p, int64_t begin, int64_t end) {
  const float inv = p.inv_scale, lo = static_cast<float>(p.lo), hi = static_cast<float>(p.hi);
  int64_t i = begin;
#if defined(CPU_CAPABILITY_AVX512)
  {
    const __m512 vinv = _mm512_set1_ps(inv), vlo = _mm512_set1_ps(lo), vhi = _mm512_set1_ps(hi);
    const bool is_signed = p.lo < 0;
    for (; i + 16 <= end; i += 16) {
      __m512 v = values16(p.x, i);
      if (p.has_y) v = _mm512_add_ps(v, values16(p.y, i));
      v = _mm512_roundscale_ps(_mm512_mul_ps(v, vinv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      v = _mm512_min_ps(_mm512_max_ps(v, vlo), vhi);  // max(NaN, lo) = lo, as fmaxf
      const __m512i q = _mm512_cvtps_epi32(v);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p.out + i),
                       is_signed ? _mm512_cvtsepi32_epi8(q) : _mm512_cvtusepi32_epi8(q));
    }
  }
#endif
#if defined(QOPS_CODES_AVX2)
  const __m256 vinv = _mm256_set1_ps(inv), vlo = _mm256_set1_ps(lo), vhi = _mm256_set1_ps(hi);
  const bool is_signed = p.lo < 0;
  for (; i + 8 <= end; i += 8) {
    __m256 v = values8(p.x, i);
    if (p.has_y) v = _mm256_add_ps(v, values8(p.y, i));
    v = _mm256_round_ps(_mm256_mul_ps(v, vinv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm256_min_ps(_mm256_max_ps(v, vlo), vhi);  // max(NaN, lo) = lo, as fmaxf
    const __m256i q = _mm256_cvtps_epi32(v);
    const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(p.out + i), is_signed ? _mm_packs_epi16(w, w) : _mm_packus_epi16(w, w));
  }
#endif
  for (; i < end; ++i) {
    float v = value_at(p.x, i);
    if (p.has_y) v += value_at(p.y, i);
    const float q = std::fmin(std::fmax(std::nearbyint(v * inv), lo), hi);
    p.out[i] = static_cast<uint8_t>(static_cast<int>(q));
  }
}

}  // namespace qops::cpu::CPU_CAPABILITY
