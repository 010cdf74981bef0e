// CUDA kernel of slimcore::penalty_prox_: weights[i] = prox_{scale[i] g}(weights[i]) in place,
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
    penalty_prox_kernel(const __grid_constant__ cuda::TensorListMeta<1> meta, const PenaltyParams pp) {
  using acc_t = at::opmath_type<scalar_t>;
  int t;
  int64_t begin, end;
  cuda::block_chunk(meta, t, begin, end);
  if (meta.scale[t] == 0.0) return;  // prox of a zero step is the identity
  scalar_t* w = static_cast<scalar_t*>(meta.addresses[0][t]);
  const acc_t mu = static_cast<acc_t>(meta.scale[t]);
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    w[i] = static_cast<scalar_t>(penalty_prox<K>(static_cast<acc_t>(w[i]), mu, pp));
  }
}

void penalty_prox_cuda(at::TensorList weights, c10::string_view penalty, c10::ArrayRef<double> scale, double p,
                       double a, double knee, double eps) {
  const PenaltyParams pp = parse_penalty(penalty, p, a, knee, eps);
  check_tensor_list(weights, "weights");
  const std::vector<double> scales = expand_scales(scale, weights.size(), "scale");
  if (weights.empty()) return;
  const c10::cuda::CUDAGuard guard(weights[0].device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  for (const auto& group : cuda::group_by_dtype(weights)) {
    dispatch_penalty_kind(pp.kind, [&](auto kind) {
      constexpr PenaltyKind K = decltype(kind)::value;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, group.first, "penalty_prox_cuda", [&] {
        cuda::multi_tensor_apply<1>({weights}, group.second, scales,
                                    [&](const cuda::TensorListMeta<1>& meta, int blocks) {
                                      penalty_prox_kernel<scalar_t, K><<<blocks, cuda::kBlockSize, 0, stream>>>(meta, pp);
                                      C10_CUDA_KERNEL_LAUNCH_CHECK();
                                    });
      });
    });
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(slimcore, CUDA, m) {
  m.impl("penalty_prox_", &penalty_prox_cuda);
}

}  // namespace slimcore
