// CPU feature detection and the ISA choice behind QOPS_CPU_DISPATCH (csrc/include/qops/cpu_dispatch.h).
#include "qops/cpu_dispatch.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <initializer_list>

namespace qops::cpu {

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = [] {
    CpuFeatures c;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    // libgcc's cpu model also checks that the OS saves the AVX/AVX-512 register state (XCR0).
    __builtin_cpu_init();
    c.avx2 = __builtin_cpu_supports("avx2");
    c.fma = __builtin_cpu_supports("fma");
    c.f16c = __builtin_cpu_supports("f16c");
    c.bmi2 = __builtin_cpu_supports("bmi2");
    c.popcnt = __builtin_cpu_supports("popcnt");
    c.avx512f = __builtin_cpu_supports("avx512f");
    c.avx512bw = __builtin_cpu_supports("avx512bw");
    c.avx512vl = __builtin_cpu_supports("avx512vl");
    c.avx512dq = __builtin_cpu_supports("avx512dq");
    c.avx512vnni = __builtin_cpu_supports("avx512vnni");
    c.avx512vpopcntdq = __builtin_cpu_supports("avx512vpopcntdq");
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
    c.avxvnni = __builtin_cpu_supports("avxvnni");
#endif
#endif
    return c;
  }();
  return f;
}

Isa max_isa() {
  const CpuFeatures& f = cpu_features();
  (void)f;
#if defined(QOPS_HAVE_AVX512)
  if (f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq && f.avx2 && f.fma) return Isa::AVX512;
#endif
#if defined(QOPS_HAVE_AVX2)
  if (f.avx2 && f.fma && f.f16c && f.bmi2 && f.popcnt) return Isa::AVX2;
#endif
  return Isa::DEFAULT;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::AVX512: return "AVX512";
    case Isa::AVX2: return "AVX2";
    default: return "DEFAULT";
  }
}

bool parse_isa(const char* name, Isa* out) {
  for (Isa i : {Isa::DEFAULT, Isa::AVX2, Isa::AVX512}) {
    if (std::strcmp(name, isa_name(i)) == 0) {
      *out = i;
      return true;
    }
  }
  return false;
}

namespace {
std::atomic<int>& chosen() {
  static std::atomic<int> value{[] {
    Isa best = max_isa();
    const char* env = std::getenv("QOPS_CPU_ISA");
    Isa want;
    // An unknown or unsupported request falls back to the best available; Python warns about it.
    if (env != nullptr && parse_isa(env, &want) && static_cast<int>(want) < static_cast<int>(best)) {
      return static_cast<int>(want);
    }
    return static_cast<int>(best);
  }()};
  return value;
}
}  // namespace

Isa isa() { return static_cast<Isa>(chosen().load(std::memory_order_relaxed)); }

bool set_isa(Isa want) {
  if (static_cast<int>(want) > static_cast<int>(max_isa())) return false;
  chosen().store(static_cast<int>(want));
  return true;
}

}  // namespace qops::cpu
