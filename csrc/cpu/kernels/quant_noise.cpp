// Hot loops of torch.ops.qops.quant_noise on CPU, compiled once per ISA (setup.py):
//   range pass: min/max per slice of x viewed as [outer, channels, inner] (vectorized, parallel);
//   noise pass: y = x + (delta/2) * eps with eps from csrc/include/qops/philox.h, in tiles of 256
//   elements. DEFAULT evaluates philox.h's scalar functions; AVX2 (and AVX512, which reuses it)
//   runs Philox and the eps transforms on 8 groups (32 elements) at once with the same operation
//   sequence, so the two paths give identical bits (tests/test_quant_noise.py forces both).
// Intrinsics rather than at::vec: ATen's AVX2 Vectorized<float> does not compile under setup.py's
// `#pragma GCC target` wrappers with GCC 12 (sleef.h declares its AVX functions only when __AVX__ is
// defined, which the pragma does not do).
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "qops/philox.h"

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#define QOPS_QN_AVX2 1
#endif

namespace qops::cpu::CPU_CAPABILITY {

namespace {

constexpr int64_t kTile = 256;                // elements per noise tile (64 Philox groups)
constexpr int64_t kGrainElems = 1 << 15;      // parallel work unit, elements
constexpr int64_t kSmallInner = 16;           // below: reduce whole [channels, inner] slabs at once

// NaN-propagating min/max (like torch.aminmax).
template <typename T>
inline T min_nan(T a, T b) {
  if (a != a) return a;
  return (b < a || b != b) ? b : a;
}
template <typename T>
inline T max_nan(T a, T b) {
  if (a != a) return a;
  return (b > a || b != b) ? b : a;
}

// The work of every at::parallel_for body is in a [[gnu::noinline]] function of this namespace:
// inlined into the OpenMP outlined functions, the vector code would sit in symbols named after
// at::internal (tests/test_build.py checks where ymm/zmm code lives).
#define QOPS_QN_NOINLINE [[gnu::noinline]]

// Runs body(begin, end) over [0, n) in chunks of `grain` that the threads claim one at a time.
// at::parallel_for gives each thread one fixed share, so on a shared machine a thread that the OS
// parks holds up the whole call; here the running threads take its chunks. The chunks are the
// same whatever thread runs them, so results do not depend on the schedule.
template <typename Body>
void parallel_chunks(int64_t n, int64_t grain, const Body& body) {
  const int64_t chunks = (n + grain - 1) / grain;
  if (chunks <= 1 || at::get_num_threads() == 1 || at::in_parallel_region()) {
    body(0, n);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), chunks), 1, [&](int64_t, int64_t) {
    for (int64_t chunk = next.fetch_add(1); chunk < chunks; chunk = next.fetch_add(1)) {
      body(chunk * grain, std::min(n, (chunk + 1) * grain));
    }
  });
}

// lo/hi of x[0..n) merged into lo/hi. Plain compares (which drop NaN) plus a separate NaN flag
// (which restores it), so the loop vectorizes.
template <typename T>
QOPS_QN_NOINLINE void reduce_span(const T* x, int64_t n, T& lo, T& hi) {
  T l = lo, h = hi;
  bool nan = false;
  int64_t i = 0;
#if defined(QOPS_QN_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    if (n >= 16) {
      __m256 l0 = _mm256_loadu_ps(x), h0 = l0, l1 = _mm256_loadu_ps(x + 8), h1 = l1;
      __m256 bad = _mm256_or_ps(_mm256_cmp_ps(l0, l0, _CMP_UNORD_Q), _mm256_cmp_ps(l1, l1, _CMP_UNORD_Q));
      for (i = 16; i + 16 <= n; i += 16) {
        const __m256 a = _mm256_loadu_ps(x + i);
        const __m256 b = _mm256_loadu_ps(x + i + 8);
        l0 = _mm256_min_ps(l0, a);
        h0 = _mm256_max_ps(h0, a);
        l1 = _mm256_min_ps(l1, b);
        h1 = _mm256_max_ps(h1, b);
        bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, b, _CMP_UNORD_Q));
      }
      alignas(32) float lv[8], hv[8];
      _mm256_store_ps(lv, _mm256_min_ps(l0, l1));
      _mm256_store_ps(hv, _mm256_max_ps(h0, h1));
      for (int k = 0; k < 8; ++k) {
        l = lv[k] < l ? lv[k] : l;
        h = hv[k] > h ? hv[k] : h;
      }
      nan = _mm256_movemask_ps(bad) != 0;
    }
  }
#endif
  for (; i < n; ++i) {
    const T v = x[i];
    l = v < l ? v : l;
    h = v > h ? v : h;
    nan |= v != v;
  }
  if (nan) l = h = std::numeric_limits<T>::quiet_NaN();
  lo = min_nan(lo, l);
  hi = max_nan(hi, h);
}

template <typename T>
QOPS_QN_NOINLINE void reduce_rows(const T* x, int64_t inner, int64_t begin, int64_t end, T* rlo, T* rhi) {
  for (int64_t r = begin; r < end; ++r) reduce_span(x + r * inner, inner, rlo[r], rhi[r]);
}

// Elementwise min/max of the slabs [begin, end) (each `slab` elements) into lo/hi[0..slab).
template <typename T>
QOPS_QN_NOINLINE void reduce_slabs(const T* x, int64_t slab, int64_t begin, int64_t end, T* lo, T* hi) {
  for (int64_t o = begin; o < end; ++o) {
    const T* xs = x + o * slab;
    for (int64_t k = 0; k < slab; ++k) {
      lo[k] = min_nan(lo[k], xs[k]);
      hi[k] = max_nan(hi[k], xs[k]);
    }
  }
}

// Elementwise min/max over all `outer` slabs of the positions [begin, end) of a slab.
template <typename T>
QOPS_QN_NOINLINE void reduce_columns(const T* x, int64_t slab, int64_t outer, int64_t begin, int64_t end, T* lo,
                                     T* hi) {
  for (int64_t o = 0; o < outer; ++o) {
    const T* xs = x + o * slab;
    for (int64_t k = begin; k < end; ++k) {
      lo[k] = min_nan(lo[k], xs[k]);
      hi[k] = max_nan(hi[k], xs[k]);
    }
  }
}

// lo/hi[c] = min/max of slice c. Min and max are exact and order-independent, so every split of
// the work gives the same result.
template <typename T>
void range_impl(const T* x, int64_t outer, int64_t channels, int64_t inner, T* lo, T* hi) {
  const T inf = std::numeric_limits<T>::infinity();
  std::fill(lo, lo + channels, inf);
  std::fill(hi, hi + channels, -inf);
  const int64_t numel = outer * channels * inner;
  const int nthreads = at::get_num_threads();
  if (channels == 1 && outer == 1) {
    // One range over a contiguous span: per-thread partials.
    std::vector<T> plo(nthreads, inf), phi(nthreads, -inf);
    parallel_chunks(numel, kGrainElems, [&](int64_t b, int64_t e) {
      const int t = at::get_thread_num();
      reduce_span(x + b, e - b, plo[t], phi[t]);
    });
    for (int t = 0; t < nthreads; ++t) {
      lo[0] = min_nan(lo[0], plo[t]);
      hi[0] = max_nan(hi[0], phi[t]);
    }
  } else if (inner >= kSmallInner) {
    // Rows of `inner` contiguous elements: reduce each row, then the rows of each slice.
    const int64_t rows = outer * channels;
    std::vector<T> rlo(rows, inf), rhi(rows, -inf);
    parallel_chunks(rows, std::max<int64_t>(1, kGrainElems / inner), [&](int64_t b, int64_t e) {
      reduce_rows(x, inner, b, e, rlo.data(), rhi.data());
    });
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t c = r % channels;
      lo[c] = min_nan(lo[c], rlo[r]);
      hi[c] = max_nan(hi[c], rhi[r]);
    }
  } else {
    // Short rows (e.g. the last axis): elementwise min/max of the [channels, inner] slabs, then
    // fold the `inner` positions of each channel. Many short slabs: per-thread partial slabs;
    // few long ones: threads split the slab positions instead.
    const int64_t slab = channels * inner;
    std::vector<T> slo, shi;
    if (outer > slab) {
      slo.assign(static_cast<size_t>(nthreads) * slab, inf);
      shi.assign(static_cast<size_t>(nthreads) * slab, -inf);
      parallel_chunks(outer, std::max<int64_t>(1, kGrainElems / slab), [&](int64_t b, int64_t e) {
        const int64_t t = at::get_thread_num();
        reduce_slabs(x, slab, b, e, slo.data() + t * slab, shi.data() + t * slab);
      });
    } else {
      slo.assign(slab, inf);
      shi.assign(slab, -inf);
      parallel_chunks(slab, std::max<int64_t>(1, kGrainElems / outer), [&](int64_t b, int64_t e) {
        reduce_columns(x, slab, outer, b, e, slo.data(), shi.data());
      });
    }
    for (size_t k = 0; k < slo.size(); ++k) {
      const int64_t c = static_cast<int64_t>(k % slab) / inner;
      lo[c] = min_nan(lo[c], slo[k]);
      hi[c] = max_nan(hi[c], shi[k]);
    }
  }
}

// half_delta of the elements [first, first + n) of the flat order, in `out`.
template <typename T>
void fill_half_delta(const T* half_delta, int64_t channels, int64_t inner, int64_t first, int64_t n, T* out) {
  int64_t c = (first / inner) % channels;
  int64_t pos = first % inner;
  int64_t k = 0;
  while (k < n) {
    const int64_t run = std::min(inner - pos, n - k);
    std::fill_n(out + k, run, half_delta[c]);
    k += run;
    pos = 0;
    if (++c == channels) c = 0;
  }
}

#if !defined(QOPS_QN_AVX2)
// eps of one tile (kTile elements from `first_group` * 4) with philox.h's scalar functions.
void tile_eps_scalar(int64_t seed, uint32_t stream, uint64_t first_group, NoiseDist dist, float* eps) {
  for (int64_t g = 0; g < kTile / 4; ++g) {
    const Float4 e = dist == NoiseDist::kGaussian ? philox_normal4(seed, stream, first_group + g)
                                                  : philox_uniform4(seed, stream, first_group + g);
    for (int j = 0; j < 4; ++j) eps[4 * g + j] = e.v[j];
  }
}
#endif

#if defined(QOPS_QN_AVX2)

// (hi, lo) words of m * a for 8 uint32 lanes: _mm256_mul_epu32 multiplies the even lanes; the odd
// lanes are moved down first. Dword shuffles rather than 64-bit shifts: they issue on more ports.
inline void mulhilo8(__m256i a, __m256i m, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, m);
  const __m256i odd = _mm256_mul_epu32(_mm256_shuffle_epi32(a, _MM_SHUFFLE(3, 3, 1, 1)), m);
  lo = _mm256_blend_epi32(even, _mm256_shuffle_epi32(odd, _MM_SHUFFLE(2, 2, 0, 0)), 0xAA);
  hi = _mm256_blend_epi32(_mm256_shuffle_epi32(even, _MM_SHUFFLE(3, 3, 1, 1)), odd, 0xAA);
}

// Philox4x32-10 of kBlocks x 8 groups: counters (g_lo[b][lane], g_hi, stream, 0), key (k0, k1).
// The blocks are independent chains, interleaved to hide the multiply latency of each round.
template <int kBlocks>
inline void philox8(const __m256i* g_lo, __m256i g_hi, __m256i stream, uint32_t k0, uint32_t k1, __m256i (*r)[4]) {
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(philox_detail::kMul0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(philox_detail::kMul1));
  __m256i c0[kBlocks], c1[kBlocks], c2[kBlocks], c3[kBlocks];
  for (int b = 0; b < kBlocks; ++b) {
    c0[b] = g_lo[b];
    c1[b] = g_hi;
    c2[b] = stream;
    c3[b] = _mm256_setzero_si256();
  }
  for (int round = 0; round < 10; ++round) {
    const __m256i key0 = _mm256_set1_epi32(static_cast<int>(k0));
    const __m256i key1 = _mm256_set1_epi32(static_cast<int>(k1));
    for (int b = 0; b < kBlocks; ++b) {
      __m256i hi0, lo0, hi1, lo1;
      mulhilo8(c0[b], m0, hi0, lo0);
      mulhilo8(c2[b], m1, hi1, lo1);
      c0[b] = _mm256_xor_si256(_mm256_xor_si256(hi1, c1[b]), key0);
      c1[b] = lo1;
      c2[b] = _mm256_xor_si256(_mm256_xor_si256(hi0, c3[b]), key1);
      c3[b] = lo0;
    }
    k0 += philox_detail::kWeyl0;
    k1 += philox_detail::kWeyl1;
  }
  for (int b = 0; b < kBlocks; ++b) {
    r[b][0] = c0[b];
    r[b][1] = c1[b];
    r[b][2] = c2[b];
    r[b][3] = c3[b];
  }
}

// (w >> 8) | 1 as float: the odd 24-bit integer behind philox_unit.
inline __m256 odd24(__m256i w) {
  return _mm256_cvtepi32_ps(_mm256_or_si256(_mm256_srli_epi32(w, 8), _mm256_set1_epi32(1)));
}

// The transforms below work on kN independent vectors in lockstep (each statement loops over
// them), so the long dependency chains (div, sqrt, Horner) of different vectors overlap.

// philox_log of kN x 8 lanes, operation for operation.
template <int kN>
inline void log8(const __m256* u, __m256* out) {
  using namespace philox_detail;
  __m256 s[kN], z[kN], p[kN], ef[kN];
  for (int n = 0; n < kN; ++n) {
    const __m256i ix = _mm256_castps_si256(u[n]);
    const __m256i e = _mm256_srai_epi32(_mm256_sub_epi32(ix, _mm256_set1_epi32(static_cast<int>(kTwoThirdsBits))), 23);
    const __m256 m = _mm256_castsi256_ps(_mm256_sub_epi32(ix, _mm256_slli_epi32(e, 23)));
    const __m256 f = _mm256_sub_ps(m, _mm256_set1_ps(1.0f));
    s[n] = _mm256_div_ps(f, _mm256_add_ps(_mm256_set1_ps(2.0f), f));
    ef[n] = _mm256_cvtepi32_ps(e);
  }
  for (int n = 0; n < kN; ++n) z[n] = _mm256_mul_ps(s[n], s[n]);
  for (int n = 0; n < kN; ++n) p[n] = _mm256_fmadd_ps(_mm256_set1_ps(kLn11), z[n], _mm256_set1_ps(kLn9));
  for (int n = 0; n < kN; ++n) p[n] = _mm256_fmadd_ps(p[n], z[n], _mm256_set1_ps(kLn7));
  for (int n = 0; n < kN; ++n) p[n] = _mm256_fmadd_ps(p[n], z[n], _mm256_set1_ps(kLn5));
  for (int n = 0; n < kN; ++n) p[n] = _mm256_fmadd_ps(p[n], z[n], _mm256_set1_ps(kLn3));
  for (int n = 0; n < kN; ++n) {
    const __m256 ln_m = _mm256_fmadd_ps(_mm256_mul_ps(s[n], z[n]), p[n], _mm256_add_ps(s[n], s[n]));
    out[n] = _mm256_fmadd_ps(ef[n], _mm256_set1_ps(kLn2Hi), _mm256_fmadd_ps(ef[n], _mm256_set1_ps(kLn2Lo), ln_m));
  }
}

// philox_sincos_turn of kN x 8 lanes.
template <int kN>
inline void sincos8(const __m256i* w, __m256* cos_out, __m256* sin_out) {
  using namespace philox_detail;
  __m256i q[kN];
  __m256 r[kN], x2[kN], ps[kN], pc[kN];
  for (int n = 0; n < kN; ++n) {
    const __m256i a = _mm256_or_si256(_mm256_srli_epi32(w[n], 8), _mm256_set1_epi32(1));
    q[n] = _mm256_srli_epi32(_mm256_add_epi32(a, _mm256_set1_epi32(1 << 21)), 22);
    r[n] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(a, _mm256_slli_epi32(q[n], 22))), _mm256_set1_ps(0x1p-22f));
    x2[n] = _mm256_mul_ps(r[n], r[n]);
  }
  for (int n = 0; n < kN; ++n) {
    ps[n] = _mm256_fmadd_ps(_mm256_set1_ps(kSin9), x2[n], _mm256_set1_ps(kSin7));
    pc[n] = _mm256_fmadd_ps(_mm256_set1_ps(kCos10), x2[n], _mm256_set1_ps(kCos8));
  }
  for (int n = 0; n < kN; ++n) {
    ps[n] = _mm256_fmadd_ps(ps[n], x2[n], _mm256_set1_ps(kSin5));
    pc[n] = _mm256_fmadd_ps(pc[n], x2[n], _mm256_set1_ps(kCos6));
  }
  for (int n = 0; n < kN; ++n) {
    ps[n] = _mm256_fmadd_ps(ps[n], x2[n], _mm256_set1_ps(kSin3));
    pc[n] = _mm256_fmadd_ps(pc[n], x2[n], _mm256_set1_ps(kCos4));
  }
  for (int n = 0; n < kN; ++n) {
    ps[n] = _mm256_fmadd_ps(ps[n], x2[n], _mm256_set1_ps(kSin1));
    pc[n] = _mm256_fmadd_ps(pc[n], x2[n], _mm256_set1_ps(kCos2));
  }
  const __m256i one = _mm256_set1_epi32(1), two = _mm256_set1_epi32(2);
  for (int n = 0; n < kN; ++n) {
    const __m256 sn = _mm256_mul_ps(r[n], ps[n]);
    const __m256 cs = _mm256_fmadd_ps(pc[n], x2[n], _mm256_set1_ps(1.0f));
    // Rotate by q quarter turns; cos is negative for q in {1, 2}, sin for q in {2, 3}.
    const __m256 swap = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(q[n], one), one));
    const __m256 c = _mm256_blendv_ps(cs, sn, swap);
    const __m256 s = _mm256_blendv_ps(sn, cs, swap);
    const __m256i neg_c = _mm256_slli_epi32(_mm256_and_si256(_mm256_add_epi32(q[n], one), two), 30);
    const __m256i neg_s = _mm256_slli_epi32(_mm256_and_si256(q[n], two), 30);
    cos_out[n] = _mm256_xor_ps(c, _mm256_castsi256_ps(neg_c));
    sin_out[n] = _mm256_xor_ps(s, _mm256_castsi256_ps(neg_s));
  }
}

// z[j][lane] (word j of group lane) -> 32 floats in element order (group-major).
inline void store_groups(__m256 z0, __m256 z1, __m256 z2, __m256 z3, float* out) {
  const __m256 t0 = _mm256_unpacklo_ps(z0, z1);  // groups 0,1 | 4,5 of words 0,1
  const __m256 t1 = _mm256_unpackhi_ps(z0, z1);  // groups 2,3 | 6,7
  const __m256 t2 = _mm256_unpacklo_ps(z2, z3);
  const __m256 t3 = _mm256_unpackhi_ps(z2, z3);
  const __m256 g04 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 g15 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 g26 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 g37 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
  _mm256_storeu_ps(out, _mm256_permute2f128_ps(g04, g15, 0x20));
  _mm256_storeu_ps(out + 8, _mm256_permute2f128_ps(g26, g37, 0x20));
  _mm256_storeu_ps(out + 16, _mm256_permute2f128_ps(g04, g15, 0x31));
  _mm256_storeu_ps(out + 24, _mm256_permute2f128_ps(g26, g37, 0x31));
}

// eps of one tile with 8-lane Philox. first_group is a multiple of 64, so first_group + 63 never
// carries into the high counter word within a tile.
void tile_eps_avx2(int64_t seed, uint32_t stream, uint64_t first_group, NoiseDist dist, float* eps) {
  const uint64_t s = static_cast<uint64_t>(seed);
  const uint32_t k0 = static_cast<uint32_t>(s), k1 = static_cast<uint32_t>(s >> 32);
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i g_hi = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(first_group >> 32)));
  const __m256i strm = _mm256_set1_epi32(static_cast<int>(stream));
  constexpr int kBlocks = 2;  // 2 x 8 groups per Philox call
  for (int64_t block = 0; block < kTile / 32; block += kBlocks) {
    __m256i g_lo[kBlocks];
    for (int b = 0; b < kBlocks; ++b) {
      const uint32_t base = static_cast<uint32_t>(first_group) + static_cast<uint32_t>(8 * (block + b));
      g_lo[b] = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(base)), lanes);
    }
    __m256i r[kBlocks][4];
    philox8<kBlocks>(g_lo, g_hi, strm, k0, k1, r);
    __m256 z[kBlocks][4];
    if (dist == NoiseDist::kGaussian) {
      // Box-Muller on (word 0, word 1) and (word 2, word 3) of every block, all in lockstep.
      constexpr int kN = 2 * kBlocks;
      __m256 u[kN], ln_u[kN], c[kN], sn[kN];
      __m256i angle[kN];
      for (int n = 0; n < kN; ++n) {
        u[n] = _mm256_mul_ps(odd24(r[n / 2][2 * (n % 2)]), _mm256_set1_ps(0x1p-24f));
        angle[n] = r[n / 2][2 * (n % 2) + 1];
      }
      log8<kN>(u, ln_u);
      sincos8<kN>(angle, c, sn);
      for (int n = 0; n < kN; ++n) {
        const __m256 radius = _mm256_sqrt_ps(_mm256_mul_ps(_mm256_set1_ps(-2.0f), ln_u[n]));
        z[n / 2][2 * (n % 2)] = _mm256_mul_ps(radius, c[n]);
        z[n / 2][2 * (n % 2) + 1] = _mm256_mul_ps(radius, sn[n]);
      }
    } else {
      for (int b = 0; b < kBlocks; ++b) {
        for (int j = 0; j < 4; ++j) {
          z[b][j] = _mm256_sub_ps(_mm256_mul_ps(odd24(r[b][j]), _mm256_set1_ps(0x1p-23f)), _mm256_set1_ps(1.0f));
        }
      }
    }
    for (int b = 0; b < kBlocks; ++b) store_groups(z[b][0], z[b][1], z[b][2], z[b][3], eps + 32 * (block + b));
  }
}

// y = half_delta == 0 ? x : fma(half_delta, eps, x) over n elements (n <= kTile).
inline void apply_tile(const float* x, const float* hd, bool hd_scalar, float hd0, const float* eps, float* y, int64_t n) {
  const __m256 zero = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    const __m256 h = hd_scalar ? _mm256_set1_ps(hd0) : _mm256_loadu_ps(hd + k);
    const __m256 xv = _mm256_loadu_ps(x + k);
    const __m256 yv = _mm256_fmadd_ps(h, _mm256_loadu_ps(eps + k), xv);
    _mm256_storeu_ps(y + k, _mm256_blendv_ps(yv, xv, _mm256_cmp_ps(h, zero, _CMP_EQ_OQ)));
  }
  for (; k < n; ++k) {
    const float h = hd_scalar ? hd0 : hd[k];
    y[k] = h == 0.0f ? x[k] : std::fma(h, eps[k], x[k]);
  }
}

#else

inline void apply_tile(const float* x, const float* hd, bool hd_scalar, float hd0, const float* eps, float* y, int64_t n) {
  for (int64_t k = 0; k < n; ++k) {
    const float h = hd_scalar ? hd0 : hd[k];
    y[k] = h == 0.0f ? x[k] : std::fma(h, eps[k], x[k]);
  }
}

#endif

// Noise for the tiles [tile_begin, tile_end).
template <typename T>
QOPS_QN_NOINLINE void noise_tiles(const T* x, T* y, const T* half_delta, int64_t numel, int64_t channels, int64_t inner,
                                  int64_t seed, uint32_t stream, NoiseDist dist, int64_t tile_begin, int64_t tile_end) {
  alignas(64) float eps[kTile];
  alignas(64) T hd[kTile];
  for (int64_t t = tile_begin; t < tile_end; ++t) {
    const int64_t first = t * kTile;
    const int64_t n = std::min(kTile, numel - first);
    const uint64_t first_group = static_cast<uint64_t>(first) / 4;
#if defined(QOPS_QN_AVX2)
    tile_eps_avx2(seed, stream, first_group, dist, eps);
#else
    tile_eps_scalar(seed, stream, first_group, dist, eps);
#endif
    const bool hd_scalar = channels == 1;
    if (!hd_scalar) fill_half_delta(half_delta, channels, inner, first, n, hd);
    if constexpr (std::is_same_v<T, float>) {
      apply_tile(x + first, hd, hd_scalar, half_delta[0], eps, y + first, n);
    } else {
      for (int64_t k = 0; k < n; ++k) {
        const T h = hd_scalar ? half_delta[0] : hd[k];
        y[first + k] = h == T(0) ? x[first + k] : std::fma(h, static_cast<T>(eps[k]), x[first + k]);
      }
    }
  }
}

template <typename T>
void apply_impl(const T* x, T* y, const T* half_delta, int64_t numel, int64_t channels, int64_t inner, int64_t seed,
                uint32_t stream, NoiseDist dist) {
  const int64_t tiles = (numel + kTile - 1) / kTile;
  parallel_chunks(tiles, std::max<int64_t>(1, kGrainElems / kTile), [&](int64_t tb, int64_t te) {
    noise_tiles(x, y, half_delta, numel, channels, inner, seed, stream, dist, tb, te);
  });
}

}  // namespace

void quant_noise_range_float(const float* x, int64_t outer, int64_t channels, int64_t inner, float* lo, float* hi) {
  range_impl(x, outer, channels, inner, lo, hi);
}

void quant_noise_range_double(const double* x, int64_t outer, int64_t channels, int64_t inner, double* lo,
                              double* hi) {
  range_impl(x, outer, channels, inner, lo, hi);
}

void quant_noise_apply_float(const float* x, float* y, const float* half_delta, int64_t numel, int64_t channels,
                             int64_t inner, int64_t seed, uint32_t stream, int dist) {
  apply_impl(x, y, half_delta, numel, channels, inner, seed, stream, static_cast<NoiseDist>(dist));
}

void quant_noise_apply_double(const double* x, double* y, const double* half_delta, int64_t numel, int64_t channels,
                              int64_t inner, int64_t seed, uint32_t stream, int dist) {
  apply_impl(x, y, half_delta, numel, channels, inner, seed, stream, static_cast<NoiseDist>(dist));
}

}  // namespace qops::cpu::CPU_CAPABILITY
