// The per-ISA copies of the CPU channel_affine kernel (channel_affine_kernel.h).
#pragma once

#include <ATen/core/Tensor.h>

#include "../channel_affine_args.h"
#include "cpu_isa.h"

namespace slimcore {

#define SLIMCORE_AFFINE_DECLARE(ns)                                                                          \
  namespace ns {                                                                                             \
  void channel_affine(const AffineArgs& a, const at::Tensor& input, const int64_t* index,                   \
                      const at::Tensor& scale, const at::Tensor& shift, at::Tensor& out);                    \
  }

SLIMCORE_AFFINE_DECLARE(isa_default)
SLIMCORE_AFFINE_DECLARE(isa_avx2)
SLIMCORE_AFFINE_DECLARE(isa_avx512)
#undef SLIMCORE_AFFINE_DECLARE

}  // namespace slimcore
