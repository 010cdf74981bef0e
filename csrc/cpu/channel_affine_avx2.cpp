// The CPU channel_affine kernel (channel_affine_kernel.h) compiled for AVX2; channel_affine.cpp picks
// it at run time when the CPU and ATen's CPU capability allow. Empty on non-x86-64 or non-GCC builds.
#include "channel_affine_isa.h"

#if SLIMCORE_HAVE_AVX_COPIES
#define SLIMCORE_AFFINE_ISA isa_avx2
#define SLIMCORE_AFFINE_TARGET "avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt"
#include "channel_affine_kernel.h"
#endif
