// Checks csrc/include/qops/philox.h without torch: Random123's known-answer vectors for
// philox4x32-10, then prints the eps of a few (seed, stream) streams as float bit patterns so that
// tests/test_quant_noise.py can compare them with qops/reference.py bit for bit.
// Usage: test_philox            -> known answers only (exit status 1 on a mismatch)
//        test_philox SEED STREAM N [FIRST]  -> also prints "index gaussian_bits uniform_bits" for the
//        element indices FIRST .. FIRST+N-1 (FIRST defaults to 0)
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "qops/philox.h"

namespace {

struct Kat {
  qops::Uint4 ctr;
  uint32_t key0, key1;
  qops::Uint4 expected;
};

// From Random123's kat_vectors ("philox4x32 10" lines): counter[4] key[2] -> output[4].
const Kat kKats[] = {
    {{{0u, 0u, 0u, 0u}}, 0u, 0u, {{0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}}},
    {{{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}},
     0xffffffffu,
     0xffffffffu,
     {{0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}}},
    {{{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}},
     0xa4093822u,
     0x299f31d0u,
     {{0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}}},
};

uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

}  // namespace

int main(int argc, char** argv) {
  int failures = 0;
  for (const Kat& kat : kKats) {
    const qops::Uint4 out = qops::philox4x32_10(kat.ctr, kat.key0, kat.key1);
    for (int i = 0; i < 4; ++i) {
      if (out.v[i] != kat.expected.v[i]) {
        std::fprintf(stderr, "KAT mismatch: word %d got %08x expected %08x\n", i, out.v[i], kat.expected.v[i]);
        ++failures;
      }
    }
  }
  if (argc == 4 || argc == 5) {
    const long long seed = std::strtoll(argv[1], nullptr, 10);
    const unsigned long stream = std::strtoul(argv[2], nullptr, 10);
    const long long n = std::strtoll(argv[3], nullptr, 10);
    const long long first = argc == 5 ? std::strtoll(argv[4], nullptr, 10) : 0;
    for (long long i = first; i < first + n; ++i) {
      const float g = qops::philox_normal(seed, static_cast<uint32_t>(stream), static_cast<uint64_t>(i));
      const float u = qops::philox_uniform(seed, static_cast<uint32_t>(stream), static_cast<uint64_t>(i));
      // The group functions must agree with the per-element ones.
      const qops::Float4 g4 = qops::philox_normal4(seed, static_cast<uint32_t>(stream), static_cast<uint64_t>(i / 4));
      const qops::Float4 u4 = qops::philox_uniform4(seed, static_cast<uint32_t>(stream), static_cast<uint64_t>(i / 4));
      if (bits_of(g4.v[i % 4]) != bits_of(g) || bits_of(u4.v[i % 4]) != bits_of(u)) {
        std::fprintf(stderr, "group and element functions disagree at index %lld\n", i);
        ++failures;
      }
      std::printf("%lld %08x %08x\n", i, bits_of(g), bits_of(u));
    }
  }
  if (failures == 0) std::fprintf(stderr, "philox: all known answers match\n");
  return failures == 0 ? 0 : 1;
}
