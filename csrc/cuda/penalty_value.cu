// CUDA kernel of slimcore::penalty_value: sum_i scale[i] * sum_j g(weights[i][j]).
// One multi-tensor launch; each block reduces its chunk and adds it atomically in double.
#include <ATen/ATen.h>
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

constexpr int kWarpSize = 32;

__device__ __forceinline__ double warp_sum(double v) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

template <typename scalar_t, PenaltyKind K>
__global__ void __launch_bounds__(cuda::kBlockSize)
    penalty_value_kernel(const __grid_constant__ cuda::TensorListMeta<1> meta, const PenaltyParams pp,
                         double* __restrict__ total) {
  using acc_t = at::opmath_type<scalar_t>;
  int t;
  int64_t begin, end;
  cuda::block_chunk(meta, t, begin, end);
  const scalar_t* w = static_cast<const scalar_t*>(meta.addresses[0][t]);
  double sum = 0.0;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    sum += static_cast<double>(penalty_value<K>(static_cast<acc_t>(w[i]), pp));
  }
  __shared__ double warp_sums[cuda::kBlockSize / kWarpSize];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  sum = warp_sum(sum);
  if (lane == 0) warp_sums[warp] = sum;
  __syncthreads();
  if (warp == 0) {
    sum = lane < cuda::kBlockSize / kWarpSize ? warp_sums[lane] : 0.0;
    sum = warp_sum(sum);
    if (lane == 0) atomicAdd(total, meta.scale[t] * sum);
  }
}

at::Tensor penalty_value_cuda(at::TensorList weights, c10::string_view penalty, c10::ArrayRef<double> scale,
                              double p, double a, double knee, double eps) {
  const PenaltyParams pp = parse_penalty(penalty, p, a, knee, eps);
  check_tensor_list(weights, "weights");
  const std::vector<double> scales = expand_scales(scale, weights.size(), "scale");
  TORCH_CHECK(!weights.empty(), "slimcore: penalty_value needs at least one tensor to pick a device");
  const c10::cuda::CUDAGuard guard(weights[0].device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  bool any_double = false;
  for (const auto& w : weights) any_double = any_double || w.scalar_type() == at::kDouble;
  at::Tensor total = at::zeros({}, weights[0].options().dtype(at::kDouble));
  double* total_ptr = total.mutable_data_ptr<double>();
  for (const auto& group : cuda::group_by_dtype(weights)) {
    dispatch_penalty_kind(pp.kind, [&](auto kind) {
      constexpr PenaltyKind K = decltype(kind)::value;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, group.first, "penalty_value_cuda", [&] {
        cuda::multi_tensor_apply<1>({weights}, group.second, scales,
                                    [&](const cuda::TensorListMeta<1>& meta, int blocks) {
                                      penalty_value_kernel<scalar_t, K>
                                          <<<blocks, cuda::kBlockSize, 0, stream>>>(meta, pp, total_ptr);
                                      C10_CUDA_KERNEL_LAUNCH_CHECK();
                                    });
      });
    });
  }
  return any_double ? total : total.to(at::kFloat);
}

}  // namespace

TORCH_LIBRARY_IMPL(slimcore, CUDA, m) {
  m.impl("penalty_value", &penalty_value_cuda);
}

}  // namespace slimcore
