// Runtime CPU ISA dispatch for the kernels in csrc/cpu/kernels/.
//
// Every file in csrc/cpu/kernels/ is compiled once per ISA by setup.py (see ISAS there), with
// CPU_CAPABILITY defined to the ISA's name, so a kernel defined inside
//     namespace qops::cpu::CPU_CAPABILITY { ... }
// exists as qops::cpu::DEFAULT::f, qops::cpu::AVX2::f, qops::cpu::AVX512::f. Declare it once with
// QOPS_DECLARE_ISA_FN and call it with QOPS_CPU_DISPATCH(f, args...), which picks the best
// variant that was compiled, that this CPU supports and that QOPS_CPU_ISA allows.
#pragma once

#include <cstdint>

namespace qops::cpu {

enum class Isa : int { DEFAULT = 0, AVX2 = 1, AVX512 = 2 };

struct CpuFeatures {
  bool avx2 = false, fma = false, f16c = false, bmi2 = false, popcnt = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false;
  bool avx512vnni = false, avx512vpopcntdq = false, avxvnni = false;
};

// What the CPU (and OS) supports, read once.
const CpuFeatures& cpu_features();
// The best ISA supported by this CPU and compiled into this build.
Isa max_isa();
// The ISA in use: max_isa() capped by the environment variable QOPS_CPU_ISA
// (DEFAULT|AVX2|AVX512) at first use, or by set_isa().
Isa isa();
// Caps the ISA in use (tests force each path with it); returns false if `want` exceeds max_isa().
bool set_isa(Isa want);
const char* isa_name(Isa isa);
bool parse_isa(const char* name, Isa* out);

}  // namespace qops::cpu

#if defined(QOPS_HAVE_AVX2)
#define QOPS_IF_AVX2(...) __VA_ARGS__
#else
#define QOPS_IF_AVX2(...)
#endif
#if defined(QOPS_HAVE_AVX512)
#define QOPS_IF_AVX512(...) __VA_ARGS__
#else
#define QOPS_IF_AVX512(...)
#endif

// Declares `name` with signature `ret name params` in each compiled ISA namespace.
#define QOPS_DECLARE_ISA_FN(ret, name, params)           \
  namespace qops::cpu {                                  \
  namespace DEFAULT { ret name params; }                 \
  QOPS_IF_AVX2(namespace AVX2 { ret name params; })      \
  QOPS_IF_AVX512(namespace AVX512 { ret name params; })  \
  }

// Calls the variant of `name` for qops::cpu::isa().
#define QOPS_CPU_DISPATCH(name, ...)                                                          \
  ([&]() {                                                                                    \
    switch (::qops::cpu::isa()) {                                                             \
      QOPS_IF_AVX512(case ::qops::cpu::Isa::AVX512: return ::qops::cpu::AVX512::name(__VA_ARGS__);) \
      QOPS_IF_AVX2(case ::qops::cpu::Isa::AVX2: return ::qops::cpu::AVX2::name(__VA_ARGS__);)       \
      default: return ::qops::cpu::DEFAULT::name(__VA_ARGS__);                                \
    }                                                                                         \
  }())
