// The CPU BatchNorm kernels (batch_norm_kernel.h) compiled for AVX2; batch_norm.cpp picks them at
// run time when the CPU and ATen's CPU capability allow. Empty on non-x86-64 or non-GCC builds.
#include "batch_norm_isa.h"

#if SLIMCORE_BN_HAVE_AVX
#define SLIMCORE_BN_ISA isa_avx2
#define SLIMCORE_BN_TARGET "avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt"
#include "batch_norm_kernel.h"
#endif
