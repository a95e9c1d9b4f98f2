// The bit-packed weight format of torch.ops.qops.pack_weight, shared by the CPU and CUDA kernels
// (QOPS_HD: host and device). docs/kernels.md ("Packed weights") describes it for users.
//
// Layout ("bit-plane rows"): codes w[Cout, Cin, kh, kw] (int8) are flattened per output channel in
// PyTorch order, k = (ci * kh + ky) * kw + kx, K = Cin * kh * kw. Each code is stored as its b-bit
// two's complement pattern u = code & (2^b - 1); for b = 1 the codes are -1/+1 and u = (code + 1) / 2.
// Row co holds b bit-planes; plane j is a run of KW = ceil(K / 32) little-endian uint32 words whose
// bit r of word q is bit j of u for k = 32 q + r (bits for k >= K are 0). The buffer is uint8 of
//     Cout * b * KW * 4 bytes, word (co, j, q) at byte offset ((co * b + j) * KW + q) * 4,
// i.e. numel * b / 8 bytes plus at most 31 bits of padding per plane (none when K % 32 == 0).
// Decoding: code = sum_{j < b-1} 2^j u_j - 2^(b-1) u_{b-1} for b >= 2, code = 2 u_0 - 1 for b = 1.
//
// Why bit-planes for every width: one format for 1..8 bits with no field straddling words, the
// AND+popcount (bit-serial) kernels use the planes as they are, and the other kernels (dot
// products, lookup tables) unpack the weights once per call into their own blocked panels, which
// costs O(Cout * K) against the convolution's O(Cout * K * Ho * Wo).
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define QOPS_PL_HD __host__ __device__ __forceinline__
#else
#define QOPS_PL_HD inline
#endif

namespace qops {

// Words of 32 bits per bit-plane of one output channel.
QOPS_PL_HD int64_t packed_plane_words(int64_t K) { return (K + 31) / 32; }

// Bytes of the packed buffer for Cout rows of K codes at `bits` bits.
QOPS_PL_HD int64_t packed_weight_bytes(int64_t Cout, int64_t K, int64_t bits) {
  return Cout * bits * packed_plane_words(K) * 4;
}

// Smallest and largest code of a b-bit weight (b = 1: -1 and +1).
QOPS_PL_HD int packed_code_min(int bits) { return bits == 1 ? -1 : -(1 << (bits - 1)); }
QOPS_PL_HD int packed_code_max(int bits) { return bits == 1 ? 1 : (1 << (bits - 1)) - 1; }

// The stored pattern u of a code (see above).
QOPS_PL_HD uint32_t packed_pattern(int code, int bits) {
  return bits == 1 ? static_cast<uint32_t>((code + 1) >> 1) : static_cast<uint32_t>(code) & ((1u << bits) - 1u);
}

// The code of pattern u.
QOPS_PL_HD int packed_decode(uint32_t u, int bits) {
  if (bits == 1) return 2 * static_cast<int>(u & 1u) - 1;
  const int top = 1 << (bits - 1);
  const int v = static_cast<int>(u & ((1u << bits) - 1u));
  return v >= top ? v - 2 * top : v;
}

// Code k of row co, read from the words of the packed buffer (words = buffer viewed as uint32).
QOPS_PL_HD int packed_code_at(const uint32_t* words, int64_t co, int64_t k, int bits, int64_t KW) {
  uint32_t u = 0;
  const int64_t q = k >> 5;
  const int r = static_cast<int>(k & 31);
  for (int j = 0; j < bits; ++j) u |= ((words[(co * bits + j) * KW + q] >> r) & 1u) << j;
  return packed_decode(u, bits);
}

}  // namespace qops
