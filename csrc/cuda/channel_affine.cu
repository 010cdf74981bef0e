// CUDA kernel of slimcore::channel_affine: one thread per output element (grid-stride), reading
// its input element through index (csrc/channel_affine_args.h: Planes or Rows layout), then
// scale, shift and activation in float32 (float64 for float64 input). One launch, no
// synchronisation: index values are checked on the device (CUDA_KERNEL_ASSERT), not copied to the
// host on every call as the CPU check does. Index math is 32-bit with multiply-high division
// (IntDivider) when every position fits, 64-bit otherwise.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/detail/IntegerDivider.cuh>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "../channel_affine_args.h"
#include "../channel_affine_math.h"

namespace slimcore {
namespace {

constexpr int kBlockSize = 256;

template <typename index_t>
struct AffineGeometry {
  at::cuda::detail::IntDivider<index_t> inner;  // Planes: S; Rows: C_out
  at::cuda::detail::IntDivider<index_t> c_out;  // Planes: C_out
  index_t c_in;
  index_t S;
  bool planes;
};

template <Activation A, typename scalar_t, typename acc_t, typename index_t>
__global__ void __launch_bounds__(kBlockSize)
    channel_affine_kernel(const scalar_t* __restrict__ in, scalar_t* __restrict__ out,
                          const int64_t* __restrict__ index, const acc_t* __restrict__ scale,
                          const acc_t* __restrict__ shift, index_t total, const AffineGeometry<index_t> g) {
  const index_t stride = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t p = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < total; p += stride) {
    index_t c, src;
    if (g.planes) {
      const auto plane_s = g.inner.divmod(p);        // (n * C_out + c, s)
      const auto n_c = g.c_out.divmod(plane_s.div);  // (n, c)
      c = n_c.mod;
      index_t i = c;
      if (index != nullptr) {
        const int64_t v = index[c];
        CUDA_KERNEL_ASSERT(v >= 0 && v < static_cast<int64_t>(g.c_in) && "channel_affine: index out of range");
        i = static_cast<index_t>(v);
      }
      src = (n_c.div * g.c_in + i) * g.S + plane_s.mod;
    } else {
      const auto row_c = g.inner.divmod(p);  // (row, c)
      c = row_c.mod;
      index_t i = c;
      if (index != nullptr) {
        const int64_t v = index[c];
        CUDA_KERNEL_ASSERT(v >= 0 && v < static_cast<int64_t>(g.c_in) && "channel_affine: index out of range");
        i = static_cast<index_t>(v);
      }
      src = row_c.div * g.c_in + i;
    }
    const acc_t x = static_cast<acc_t>(in[src]);
    out[p] = static_cast<scalar_t>(activate<A, acc_t>(x * scale[c] + shift[c]));
  }
}

template <typename index_t>
AffineGeometry<index_t> geometry(const AffineArgs& a) {
  const bool planes = a.layout == AffineLayout::Planes;
  return {at::cuda::detail::IntDivider<index_t>(static_cast<index_t>(std::max<int64_t>(planes ? a.S : a.C_out, 1))),
          at::cuda::detail::IntDivider<index_t>(static_cast<index_t>(std::max<int64_t>(a.C_out, 1))),
          static_cast<index_t>(a.C_in), static_cast<index_t>(a.S), planes};
}

at::Tensor channel_affine_cuda(const at::Tensor& input, const std::optional<at::Tensor>& index,
                               const at::Tensor& scale, const at::Tensor& shift, c10::string_view activation) {
  const AffineArgs a = check_channel_affine_args(input, index, scale, shift, activation, false);
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor out = at::empty(a.out_sizes, input.options().memory_format(a.format));
  const int64_t total = a.out_numel();
  if (total == 0) return out;
  const at::Tensor k = scale.to(a.acc_type).contiguous();
  const at::Tensor c = shift.to(a.acc_type).contiguous();
  const bool gathers = index.has_value() && index->defined();
  const at::Tensor idx = gathers ? index->contiguous() : at::Tensor();
  const int64_t* i = gathers ? idx.const_data_ptr<int64_t>() : nullptr;
  int device = 0, sms = 0, threads_per_sm = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&threads_per_sm, cudaDevAttrMaxThreadsPerMultiProcessor, device));
  const int64_t max_blocks = static_cast<int64_t>(sms) * std::max(1, threads_per_sm / kBlockSize);
  const int blocks = static_cast<int>(std::min<int64_t>((total + kBlockSize - 1) / kBlockSize, max_blocks));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const bool index32 = std::max(input.numel(), total) <= std::numeric_limits<int32_t>::max();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "slimcore_channel_affine_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_activation(a.activation, [&](auto act) {
      constexpr Activation A = decltype(act)::value;
      const scalar_t* x = input.const_data_ptr<scalar_t>();
      scalar_t* y = out.mutable_data_ptr<scalar_t>();
      if (index32) {
        channel_affine_kernel<A, scalar_t, acc_t, uint32_t><<<blocks, kBlockSize, 0, stream>>>(
            x, y, i, k.const_data_ptr<acc_t>(), c.const_data_ptr<acc_t>(), static_cast<uint32_t>(total),
            geometry<uint32_t>(a));
      } else {
        channel_affine_kernel<A, scalar_t, acc_t, uint64_t><<<blocks, kBlockSize, 0, stream>>>(
            x, y, i, k.const_data_ptr<acc_t>(), c.const_data_ptr<acc_t>(), static_cast<uint64_t>(total),
            geometry<uint64_t>(a));
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(slimcore, CUDA, m) {
  m.impl("channel_affine", &channel_affine_cuda);
}

}  // namespace slimcore
