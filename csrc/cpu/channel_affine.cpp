// CPU kernel of slimcore::channel_affine: argument checks, allocation, and the choice of the
// kernel's instruction set. The kernel itself is channel_affine_kernel.h, compiled here for the
// baseline ISA and in channel_affine_avx2.cpp / channel_affine_avx512.cpp for AVX2 / AVX-512.
#define SLIMCORE_AFFINE_ISA isa_default
#include "channel_affine_kernel.h"
#undef SLIMCORE_AFFINE_ISA

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "channel_affine_isa.h"

namespace slimcore {
namespace {

at::Tensor channel_affine_cpu(const at::Tensor& input, const std::optional<at::Tensor>& index,
                              const at::Tensor& scale, const at::Tensor& shift, c10::string_view activation) {
  const AffineArgs a = check_channel_affine_args(input, index, scale, shift, activation, true);
  at::Tensor out = at::empty(a.out_sizes, input.options().memory_format(a.format));
  if (a.out_numel() == 0) return out;
  // Coefficients in the math dtype, contiguous (C_out values: negligible next to the data).
  const at::Tensor k = scale.to(a.acc_type).contiguous();
  const at::Tensor c = shift.to(a.acc_type).contiguous();
  const bool gathers = index.has_value() && index->defined();
  const at::Tensor idx = gathers ? index->contiguous() : at::Tensor();
  const int64_t* i = gathers ? idx.const_data_ptr<int64_t>() : nullptr;
  switch (cpu::best_cpu_isa()) {
#if SLIMCORE_HAVE_AVX_COPIES
    case cpu::CpuIsa::Avx512: isa_avx512::channel_affine(a, input, i, k, c, out); break;
    case cpu::CpuIsa::Avx2: isa_avx2::channel_affine(a, input, i, k, c, out); break;
#endif
    default: isa_default::channel_affine(a, input, i, k, c, out); break;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(slimcore, CPU, m) {
  m.impl("channel_affine", &channel_affine_cpu);
}

}  // namespace slimcore
