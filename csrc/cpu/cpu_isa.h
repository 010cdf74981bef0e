// Which copy of an ISA-specific CPU kernel to run: the best instruction set this CPU and ATen's CPU
// capability allow (ATEN_CPU_CAPABILITY=default or avx2 lowers it, as for ATen's own kernels).
// The AVX copies exist on x86-64 GCC builds only (SLIMCORE_HAVE_AVX_COPIES).
#pragma once

#include <ATen/Version.h>

#include <string>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SLIMCORE_HAVE_AVX_COPIES 1
#else
#define SLIMCORE_HAVE_AVX_COPIES 0
#endif

namespace slimcore {
namespace cpu {

enum class CpuIsa { Default, Avx2, Avx512 };

inline CpuIsa best_cpu_isa() {
  static const CpuIsa isa = [] {
#if SLIMCORE_HAVE_AVX_COPIES
    const std::string cap = at::get_cpu_capability();  // "DEFAULT", "AVX2", "AVX512"
    if (cap == "AVX512" && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
      return CpuIsa::Avx512;
    }
    if ((cap == "AVX2" || cap == "AVX512") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c")) {
      return CpuIsa::Avx2;
    }
#endif
    return CpuIsa::Default;
  }();
  return isa;
}

}  // namespace cpu
}  // namespace slimcore
