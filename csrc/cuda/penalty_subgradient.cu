// CUDA kernel of slimcore::penalty_subgradient_: grads[i] += scale[i] * dg(weights[i]),
// all tensors in one multi-tensor launch.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../penalty_args.h"
#include "multi_tensor_apply.cuh"

namespace slimcore {
namespace {

template <typename scalar_t, PenaltyKind K>
__global__ void __launch_bounds__(cuda::kBlockSize)
    penalty_subgradient_kernel(const __grid_constant__ cuda::TensorListMeta<2> meta, const PenaltyParams pp) {
  using acc_t = at::opmath_type<scalar_t>;
  int t;
  int64_t begin, end;
  cuda::block_chunk(meta, t, begin, end);
  const scalar_t* w = static_cast<const scalar_t*>(meta.addresses[0][t]);
  scalar_t* g = static_cast<scalar_t*>(meta.addresses[1][t]);
  const acc_t s = static_cast<acc_t>(meta.scale[t]);
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    g[i] = static_cast<scalar_t>(static_cast<acc_t>(g[i]) + s * penalty_subgradient<K>(static_cast<acc_t>(w[i]), pp));
  }
}

void penalty_subgradient_cuda(at::TensorList weights, at::TensorList grads, c10::string_view penalty,
                              c10::ArrayRef<double> scale, double p, double a, double knee, double eps) {
  const PenaltyParams pp = parse_penalty(penalty, p, a, knee, eps);
  check_tensor_list(weights, "weights");
  check_tensor_list(grads, "grads");
  check_grads_match(weights, grads);
  const std::vector<double> scales = expand_scales(scale, weights.size(), "scale");
  if (weights.empty()) return;
  const c10::cuda::CUDAGuard guard(weights[0].device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  for (const auto& group : cuda::group_by_dtype(weights)) {
    dispatch_penalty_kind(pp.kind, [&](auto kind) {
      constexpr PenaltyKind K = decltype(kind)::value;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, group.first, "penalty_subgradient_cuda", [&] {
        cuda::multi_tensor_apply<2>({weights, grads}, group.second, scales,
                                    [&](const cuda::TensorListMeta<2>& meta, int blocks) {
                                      penalty_subgradient_kernel<scalar_t, K>
                                          <<<blocks, cuda::kBlockSize, 0, stream>>>(meta, pp);
                                      C10_CUDA_KERNEL_LAUNCH_CHECK();
                                    });
      });
    });
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(slimcore, CUDA, m) {
  m.impl("penalty_subgradient_", &penalty_subgradient_cuda);
}

}  // namespace slimcore
