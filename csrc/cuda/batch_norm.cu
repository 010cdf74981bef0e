// CUDA kernels of slimcore::batch_norm (forward) and slimcore::batch_norm_backward, whose
// grad_weight carries scale * dg(weight): the penalty is added by the thread that writes the
// channel's grad_weight, so it costs no launch and no memory pass of its own.
//
// Layouts (csrc/batch_norm_args.h), following PyTorch's Normalization.cuh and apex's welford.cu:
//   planes (NCHW, S > 1): one block per channel, 2-D threads (x along the contiguous spatial run,
//     y along the batch). Forward: per-thread Welford, merged by warp shuffles then shared memory;
//     thread 0 saves mean/invstd and updates the running statistics; the same block then writes
//     the output (1 launch). Backward: the block reduces sum(dy) and sum(dy*(x-mean)), thread 0
//     writes grad_weight (+ scale * dg(weight)) and grad_bias, the block writes grad_input
//     (1 launch).
//   rows (channels_last, (N, C)): a (NHW, C) matrix, channels along threadIdx.x for coalesced
//     reads, rows split over threadIdx.y and gridDim.y. Each block merges its rows in shared
//     memory; with gridDim.y > 1 it stages its partial result and the last block of its channel
//     tile (an atomic counter) merges them and finalises the channel. A second, elementwise
//     kernel writes the output / grad_input (2 launches, as apex and PyTorch's channels-last path).
// Statistics and sums in float32 (float64 for float64 input); parameters may be float32 with
// float16/bfloat16 input (autocast).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAMathCompat.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "../batch_norm_args.h"

namespace slimcore {
namespace {

constexpr int kThreads = 512;     // threads per block, every kernel
constexpr int kRowsTx = 32;       // rows kernels: channels per block (threadIdx.x)
constexpr int kRowsTy = kThreads / kRowsTx;  // rows per block step (threadIdx.y)
constexpr int kWarp = 32;

// ------------------------------------------------------------------------------ reductions

template <typename acc_t>
struct Welford {
  acc_t mean, m2, n;
};

template <typename acc_t>
__device__ __forceinline__ Welford<acc_t> welford_merge(const Welford<acc_t>& a, const Welford<acc_t>& b) {
  const acc_t n = a.n + b.n;
  if (n == acc_t(0)) return a;
  const acc_t delta = b.mean - a.mean;
  const acc_t f = b.n / n;
  return {a.mean + delta * f, a.m2 + b.m2 + delta * delta * a.n * f, n};
}

template <typename acc_t>
__device__ __forceinline__ void welford_add(Welford<acc_t>& w, acc_t x) {
  w.n += acc_t(1);
  const acc_t delta = x - w.mean;
  w.mean += delta / w.n;
  w.m2 += delta * (x - w.mean);
}

template <typename acc_t>
__device__ __forceinline__ Welford<acc_t> warp_merge(Welford<acc_t> w) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    Welford<acc_t> o{__shfl_xor_sync(0xffffffff, w.mean, offset), __shfl_xor_sync(0xffffffff, w.m2, offset),
                     __shfl_xor_sync(0xffffffff, w.n, offset)};
    w = welford_merge(w, o);
  }
  return w;
}

template <typename acc_t>
struct Pair {
  acc_t a, b;
};

template <typename acc_t>
__device__ __forceinline__ Pair<acc_t> warp_sum(Pair<acc_t> p) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    p.a += __shfl_xor_sync(0xffffffff, p.a, offset);
    p.b += __shfl_xor_sync(0xffffffff, p.b, offset);
  }
  return p;
}

// Whole-block reductions; the result is valid in thread 0. `shared` holds one entry per warp.
template <typename acc_t>
__device__ Welford<acc_t> block_merge(Welford<acc_t> w, Welford<acc_t>* shared) {
  const int tid = threadIdx.x + threadIdx.y * blockDim.x;
  const int warps = (blockDim.x * blockDim.y + kWarp - 1) / kWarp;
  w = warp_merge(w);
  if (tid % kWarp == 0) shared[tid / kWarp] = w;
  __syncthreads();
  if (tid < kWarp) {
    w = tid < warps ? shared[tid] : Welford<acc_t>{acc_t(0), acc_t(0), acc_t(0)};
    w = warp_merge(w);
  }
  return w;
}

template <typename acc_t>
__device__ Pair<acc_t> block_sum(Pair<acc_t> p, Pair<acc_t>* shared) {
  const int tid = threadIdx.x + threadIdx.y * blockDim.x;
  const int warps = (blockDim.x * blockDim.y + kWarp - 1) / kWarp;
  p = warp_sum(p);
  if (tid % kWarp == 0) shared[tid / kWarp] = p;
  __syncthreads();
  if (tid < kWarp) {
    p = tid < warps ? shared[tid] : Pair<acc_t>{acc_t(0), acc_t(0)};
    p = warp_sum(p);
  }
  return p;
}

// ---------------------------------------------------------------------- per-channel finishing

template <typename param_t, typename acc_t>
__device__ __forceinline__ acc_t param_or(const param_t* p, int64_t c, acc_t absent) {
  return p != nullptr ? static_cast<acc_t>(p[c]) : absent;
}

// Saves the statistics of channel c and updates its running ones (training).
template <typename param_t, typename acc_t>
__device__ __forceinline__ acc_t finish_statistics(int64_t c, acc_t mean, acc_t var, acc_t count, bool training,
                                                   acc_t momentum, acc_t eps, param_t* running_mean,
                                                   param_t* running_var, acc_t* save_mean, acc_t* save_invstd) {
  const acc_t invstd = c10::cuda::compat::rsqrt(var + eps);
  save_mean[c] = mean;
  save_invstd[c] = invstd;
  if (training && running_mean != nullptr) {
    const acc_t unbiased = count > acc_t(1) ? var * count / (count - acc_t(1)) : var;
    running_mean[c] = static_cast<param_t>(momentum * mean + (acc_t(1) - momentum) * static_cast<acc_t>(running_mean[c]));
    running_var[c] = static_cast<param_t>(momentum * unbiased + (acc_t(1) - momentum) * static_cast<acc_t>(running_var[c]));
  }
  return invstd;
}

// grad_weight (+ scale * dg(weight)) and grad_bias of channel c; returns grad_input's coefficients:
// grad_input = (dy - mdy) * k1 + (x - mean) * k2.
template <typename param_t, typename acc_t>
__device__ __forceinline__ void finish_gradients(int64_t c, acc_t sdy, acc_t sdyx, acc_t count, acc_t invstd,
                                                 const param_t* weight, bool training, const BNPenalty& pen,
                                                 param_t* grad_weight, param_t* grad_bias, acc_t& mdy, acc_t& k1,
                                                 acc_t& k2) {
  const acc_t gamma = param_or(weight, c, acc_t(1));
  acc_t gw = sdyx * invstd;
  if (pen.active) gw += static_cast<acc_t>(pen.scale) * penalty_subgradient_dynamic<acc_t>(gamma, pen.params);
  grad_weight[c] = static_cast<param_t>(gw);
  grad_bias[c] = static_cast<param_t>(sdy);
  k1 = gamma * invstd;
  if (training && count > acc_t(0)) {
    mdy = sdy / count;
    k2 = -k1 * invstd * invstd * sdyx / count;
  } else {
    mdy = acc_t(0);
    k2 = acc_t(0);
  }
}

// ------------------------------------------------------------------------------ planes (NCHW)

template <typename scalar_t, typename param_t>
__global__ void __launch_bounds__(kThreads)
    planes_forward_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, int64_t N, int64_t C, int64_t S,
                          const param_t* weight, const param_t* bias, param_t* running_mean, param_t* running_var,
                          at::opmath_type<scalar_t>* save_mean, at::opmath_type<scalar_t>* save_invstd,
                          bool training, at::opmath_type<scalar_t> momentum, at::opmath_type<scalar_t> eps) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ Welford<acc_t> shared[kThreads / kWarp];
  __shared__ acc_t coef[2];  // mean, gamma * invstd
  const int64_t c = blockIdx.x;
  if (training) {
    Welford<acc_t> w{acc_t(0), acc_t(0), acc_t(0)};
    for (int64_t n = threadIdx.y; n < N; n += blockDim.y) {
      const scalar_t* p = x + (n * C + c) * S;
      for (int64_t s = threadIdx.x; s < S; s += blockDim.x) welford_add(w, static_cast<acc_t>(p[s]));
    }
    w = block_merge(w, shared);
    if (threadIdx.x == 0 && threadIdx.y == 0) {
      const acc_t var = w.n > acc_t(0) ? w.m2 / w.n : acc_t(0);
      const acc_t invstd = finish_statistics(c, w.mean, var, w.n, true, momentum, eps, running_mean, running_var,
                                             save_mean, save_invstd);
      coef[0] = w.mean;
      coef[1] = param_or(weight, c, acc_t(1)) * invstd;
    }
  } else if (threadIdx.x == 0 && threadIdx.y == 0) {
    const acc_t mean = static_cast<acc_t>(running_mean[c]);
    const acc_t invstd = finish_statistics(c, mean, static_cast<acc_t>(running_var[c]), acc_t(0), false, momentum,
                                           eps, running_mean, running_var, save_mean, save_invstd);
    coef[0] = mean;
    coef[1] = param_or(weight, c, acc_t(1)) * invstd;
  }
  __syncthreads();
  const acc_t mean = coef[0], k = coef[1], beta = param_or(bias, c, acc_t(0));
  for (int64_t n = threadIdx.y; n < N; n += blockDim.y) {
    const int64_t off = (n * C + c) * S;
    for (int64_t s = threadIdx.x; s < S; s += blockDim.x) {
      y[off + s] = static_cast<scalar_t>((static_cast<acc_t>(x[off + s]) - mean) * k + beta);
    }
  }
}

template <typename scalar_t, typename param_t>
__global__ void __launch_bounds__(kThreads)
    planes_backward_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                           scalar_t* __restrict__ dx, int64_t N, int64_t C, int64_t S, const param_t* weight,
                           const at::opmath_type<scalar_t>* save_mean, const at::opmath_type<scalar_t>* save_invstd,
                           bool training, const BNPenalty pen, param_t* grad_weight, param_t* grad_bias) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ Pair<acc_t> shared[kThreads / kWarp];
  __shared__ acc_t coef[3];  // mdy, k1, k2
  const int64_t c = blockIdx.x;
  const acc_t mean = save_mean[c];
  Pair<acc_t> sums{acc_t(0), acc_t(0)};
  for (int64_t n = threadIdx.y; n < N; n += blockDim.y) {
    const int64_t off = (n * C + c) * S;
    for (int64_t s = threadIdx.x; s < S; s += blockDim.x) {
      const acc_t g = static_cast<acc_t>(dy[off + s]);
      sums.a += g;
      sums.b += g * (static_cast<acc_t>(x[off + s]) - mean);
    }
  }
  sums = block_sum(sums, shared);
  if (threadIdx.x == 0 && threadIdx.y == 0) {
    acc_t mdy, k1, k2;
    finish_gradients(c, sums.a, sums.b, static_cast<acc_t>(N * S), save_invstd[c], weight, training, pen, grad_weight,
                     grad_bias, mdy, k1, k2);
    coef[0] = mdy;
    coef[1] = k1;
    coef[2] = k2;
  }
  __syncthreads();
  const acc_t mdy = coef[0], k1 = coef[1], k2 = coef[2];
  for (int64_t n = threadIdx.y; n < N; n += blockDim.y) {
    const int64_t off = (n * C + c) * S;
    for (int64_t s = threadIdx.x; s < S; s += blockDim.x) {
      dx[off + s] = static_cast<scalar_t>((static_cast<acc_t>(dy[off + s]) - mdy) * k1 +
                                          (static_cast<acc_t>(x[off + s]) - mean) * k2);
    }
  }
}

dim3 planes_block(int64_t S) {
  int tx = kWarp;
  while (tx < S && tx < kThreads) tx *= 2;
  return dim3(tx, kThreads / tx);
}

// --------------------------------------------------------------------------- rows (NHWC, NC)

// Grid of the rows reductions: channel tiles along x, row splits along y (enough blocks to fill
// the GPU, at least 4 row steps per thread).
dim3 rows_grid(int64_t R, int64_t C) {
  const int64_t tiles = (C + kRowsTx - 1) / kRowsTx;
  const int64_t target = 4 * static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
  int64_t splits = std::min<int64_t>((R + 4 * kRowsTy - 1) / (4 * kRowsTy), std::max<int64_t>(1, target / tiles));
  splits = std::max<int64_t>(1, std::min<int64_t>(splits, 65535));
  return dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(splits));
}

// Merges Welford states across threadIdx.y in shared memory (kRowsTy x kRowsTx); the result for
// channel column threadIdx.x is valid in the threads with threadIdx.y == 0.
template <typename acc_t>
__device__ Welford<acc_t> column_merge(Welford<acc_t> w, Welford<acc_t> (*shared)[kRowsTx]) {
  shared[threadIdx.y][threadIdx.x] = w;
  __syncthreads();
  for (int half = kRowsTy / 2; half > 0; half /= 2) {
    if (threadIdx.y < half) {
      w = welford_merge(w, shared[threadIdx.y + half][threadIdx.x]);
      shared[threadIdx.y][threadIdx.x] = w;
    }
    __syncthreads();
  }
  return w;
}

template <typename acc_t>
__device__ Pair<acc_t> column_sum(Pair<acc_t> p, Pair<acc_t> (*shared)[kRowsTx]) {
  shared[threadIdx.y][threadIdx.x] = p;
  __syncthreads();
  for (int half = kRowsTy / 2; half > 0; half /= 2) {
    if (threadIdx.y < half) {
      p.a += shared[threadIdx.y + half][threadIdx.x].a;
      p.b += shared[threadIdx.y + half][threadIdx.x].b;
      shared[threadIdx.y][threadIdx.x] = p;
    }
    __syncthreads();
  }
  return p;
}

// True in every thread of the block that arrives last at its channel tile's counter. Partial
// results must have been written (and fenced) before.
__device__ bool last_block_of_tile(int* semaphores) {
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0 && threadIdx.y == 0) {
    last = atomicAdd(&semaphores[blockIdx.x], 1) == static_cast<int>(gridDim.y) - 1;
  }
  __syncthreads();
  return last;
}

template <typename scalar_t, typename param_t>
__global__ void __launch_bounds__(kThreads)
    rows_statistics_kernel(const scalar_t* __restrict__ x, int64_t R, int64_t C, param_t* running_mean,
                           param_t* running_var, at::opmath_type<scalar_t>* save_mean,
                           at::opmath_type<scalar_t>* save_invstd, at::opmath_type<scalar_t> momentum,
                           at::opmath_type<scalar_t> eps, at::opmath_type<scalar_t>* staging, int* semaphores) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ Welford<acc_t> shared[kRowsTy][kRowsTx];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kRowsTx + threadIdx.x;
  Welford<acc_t> w{acc_t(0), acc_t(0), acc_t(0)};
  if (c < C) {
    for (int64_t r = static_cast<int64_t>(blockIdx.y) * kRowsTy + threadIdx.y; r < R;
         r += static_cast<int64_t>(gridDim.y) * kRowsTy) {
      welford_add(w, static_cast<acc_t>(x[r * C + c]));
    }
  }
  w = column_merge(w, shared);
  if (gridDim.y > 1) {
    // staging: [3][gridDim.y][C] = mean, m2, n of every (row split, channel)
    const int64_t splits = gridDim.y;
    if (threadIdx.y == 0 && c < C) {
      staging[(0 * splits + blockIdx.y) * C + c] = w.mean;
      staging[(1 * splits + blockIdx.y) * C + c] = w.m2;
      staging[(2 * splits + blockIdx.y) * C + c] = w.n;
    }
    if (!last_block_of_tile(semaphores)) return;
    w = Welford<acc_t>{acc_t(0), acc_t(0), acc_t(0)};
    if (c < C) {
      for (int64_t b = threadIdx.y; b < splits; b += kRowsTy) {
        const Welford<acc_t> o{__ldcg(&staging[(0 * splits + b) * C + c]), __ldcg(&staging[(1 * splits + b) * C + c]),
                               __ldcg(&staging[(2 * splits + b) * C + c])};
        w = welford_merge(w, o);
      }
    }
    w = column_merge(w, shared);
  }
  if (threadIdx.y == 0 && c < C) {
    const acc_t var = w.n > acc_t(0) ? w.m2 / w.n : acc_t(0);
    finish_statistics(c, w.mean, var, w.n, true, momentum, eps, running_mean, running_var, save_mean, save_invstd);
  }
}

// y[r, c] = (x[r, c] - mean[c]) * gamma[c] * invstd[c] + beta[c]. Eval mode (from_running): the
// statistics come from the running ones, and the row-0 threads save them.
template <typename scalar_t, typename param_t>
__global__ void __launch_bounds__(kThreads)
    rows_transform_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, int64_t R, int64_t C,
                          const param_t* weight, const param_t* bias, const param_t* running_mean,
                          const param_t* running_var, at::opmath_type<scalar_t>* save_mean,
                          at::opmath_type<scalar_t>* save_invstd, bool from_running, at::opmath_type<scalar_t> eps) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < C;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc_t mean, invstd;
    if (from_running) {
      mean = static_cast<acc_t>(running_mean[c]);
      invstd = c10::cuda::compat::rsqrt(static_cast<acc_t>(running_var[c]) + eps);
      if (blockIdx.y == 0 && threadIdx.y == 0) {
        save_mean[c] = mean;
        save_invstd[c] = invstd;
      }
    } else {
      mean = save_mean[c];
      invstd = save_invstd[c];
    }
    const acc_t k = param_or(weight, c, acc_t(1)) * invstd, beta = param_or(bias, c, acc_t(0));
    for (int64_t r = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; r < R;
         r += static_cast<int64_t>(gridDim.y) * blockDim.y) {
      y[r * C + c] = static_cast<scalar_t>((static_cast<acc_t>(x[r * C + c]) - mean) * k + beta);
    }
  }
}

template <typename scalar_t, typename param_t>
__global__ void __launch_bounds__(kThreads)
    rows_grad_sums_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x, int64_t R, int64_t C,
                          const param_t* weight, const at::opmath_type<scalar_t>* save_mean,
                          const at::opmath_type<scalar_t>* save_invstd, bool training, const BNPenalty pen,
                          param_t* grad_weight, param_t* grad_bias, at::opmath_type<scalar_t>* coef,
                          at::opmath_type<scalar_t>* staging, int* semaphores) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ Pair<acc_t> shared[kRowsTy][kRowsTx];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kRowsTx + threadIdx.x;
  Pair<acc_t> p{acc_t(0), acc_t(0)};
  if (c < C) {
    const acc_t mean = save_mean[c];
    for (int64_t r = static_cast<int64_t>(blockIdx.y) * kRowsTy + threadIdx.y; r < R;
         r += static_cast<int64_t>(gridDim.y) * kRowsTy) {
      const acc_t g = static_cast<acc_t>(dy[r * C + c]);
      p.a += g;
      p.b += g * (static_cast<acc_t>(x[r * C + c]) - mean);
    }
  }
  p = column_sum(p, shared);
  if (gridDim.y > 1) {
    const int64_t splits = gridDim.y;  // staging: [2][gridDim.y][C]
    if (threadIdx.y == 0 && c < C) {
      staging[(0 * splits + blockIdx.y) * C + c] = p.a;
      staging[(1 * splits + blockIdx.y) * C + c] = p.b;
    }
    if (!last_block_of_tile(semaphores)) return;
    p = Pair<acc_t>{acc_t(0), acc_t(0)};
    if (c < C) {
      for (int64_t b = threadIdx.y; b < splits; b += kRowsTy) {
        p.a += __ldcg(&staging[(0 * splits + b) * C + c]);
        p.b += __ldcg(&staging[(1 * splits + b) * C + c]);
      }
    }
    p = column_sum(p, shared);
  }
  if (threadIdx.y == 0 && c < C) {
    acc_t mdy, k1, k2;
    finish_gradients(c, p.a, p.b, static_cast<acc_t>(R), save_invstd[c], weight, training, pen, grad_weight,
                     grad_bias, mdy, k1, k2);
    coef[c] = mdy;
    coef[C + c] = k1;
    coef[2 * C + c] = k2;
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    rows_grad_input_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                           scalar_t* __restrict__ dx, int64_t R, int64_t C,
                           const at::opmath_type<scalar_t>* save_mean, const at::opmath_type<scalar_t>* coef) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < C;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const acc_t mean = save_mean[c], mdy = coef[c], k1 = coef[C + c], k2 = coef[2 * C + c];
    for (int64_t r = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; r < R;
         r += static_cast<int64_t>(gridDim.y) * blockDim.y) {
      dx[r * C + c] = static_cast<scalar_t>((static_cast<acc_t>(dy[r * C + c]) - mdy) * k1 +
                                            (static_cast<acc_t>(x[r * C + c]) - mean) * k2);
    }
  }
}

// Grid of the rows elementwise kernels: channel tiles along x, enough row blocks to fill the GPU.
dim3 rows_elementwise_grid(int64_t R, int64_t C) {
  const int64_t tiles = std::min<int64_t>((C + kRowsTx - 1) / kRowsTx, 65535);
  const int64_t target = 8 * static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
  const int64_t splits = std::max<int64_t>(
      1, std::min<int64_t>({(R + kRowsTy - 1) / kRowsTy, std::max<int64_t>(1, target / tiles), 65535}));
  return dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(splits));
}

// ----------------------------------------------------------------------------------- entries

template <typename T>
T* ptr_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr<T>() : nullptr;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_cuda(
    const at::Tensor& input, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var, bool training,
    double momentum, double eps, c10::string_view penalty, double scale, double p, double a, double knee,
    double penalty_eps) {
  const BNShape s = check_batch_norm_forward(input, weight, bias, running_mean, running_var, training, momentum, eps);
  parse_batch_norm_penalty(penalty, scale, p, a, knee, penalty_eps, weight.has_value() && weight->defined());
  const at::ScalarType acc = batch_norm_acc_type(input.scalar_type());
  const at::ScalarType param_type = batch_norm_param_type(input, {&weight, &bias, &running_mean, &running_var});
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor out = at::empty_like(input);
  if (training && s.count() == 0) {  // empty batch: nothing to normalise, running statistics unchanged
    return {out, at::zeros({s.C}, input.options().dtype(acc)), at::zeros({s.C}, input.options().dtype(acc))};
  }
  at::Tensor save_mean = at::empty({s.C}, input.options().dtype(acc));
  at::Tensor save_invstd = at::empty({s.C}, input.options().dtype(acc));
  if (s.C == 0) return {out, save_mean, save_invstd};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "slimcore_batch_norm_cuda", [&] {
    with_param_type<scalar_t>(param_type, [&](auto param_tag) {
      using param_t = decltype(param_tag);
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* x = input.const_data_ptr<scalar_t>();
      scalar_t* y = out.mutable_data_ptr<scalar_t>();
      const param_t* w = ptr_or_null<param_t>(weight);
      const param_t* b = ptr_or_null<param_t>(bias);
      param_t* rm = ptr_or_null<param_t>(running_mean);
      param_t* rv = ptr_or_null<param_t>(running_var);
      acc_t* sm = save_mean.mutable_data_ptr<acc_t>();
      acc_t* si = save_invstd.mutable_data_ptr<acc_t>();
      const acc_t mom = static_cast<acc_t>(momentum), e = static_cast<acc_t>(eps);
      if (s.layout == BNLayout::Planes) {
        planes_forward_kernel<scalar_t, param_t><<<static_cast<unsigned>(s.C), planes_block(s.S), 0, stream>>>(
            x, y, s.N, s.C, s.S, w, b, rm, rv, sm, si, training, mom, e);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        return;
      }
      const int64_t R = s.count();
      if (training) {
        const dim3 grid = rows_grid(R, s.C);
        at::Tensor staging, semaphores;
        if (grid.y > 1) {
          staging = at::empty({3, grid.y, s.C}, input.options().dtype(acc));
          semaphores = at::zeros({grid.x}, input.options().dtype(at::kInt));
        }
        rows_statistics_kernel<scalar_t, param_t><<<grid, dim3(kRowsTx, kRowsTy), 0, stream>>>(
            x, R, s.C, rm, rv, sm, si, mom, e, grid.y > 1 ? staging.mutable_data_ptr<acc_t>() : nullptr,
            grid.y > 1 ? semaphores.mutable_data_ptr<int>() : nullptr);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      rows_transform_kernel<scalar_t, param_t><<<rows_elementwise_grid(R, s.C), dim3(kRowsTx, kRowsTy), 0, stream>>>(
          x, y, R, s.C, w, b, rm, rv, sm, si, !training, e);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {out, save_mean, save_invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const at::Tensor& save_mean, const at::Tensor& save_invstd, bool training, c10::string_view penalty, double scale,
    double p, double a, double knee, double penalty_eps) {
  const BNShape s = check_batch_norm_backward(grad_out, input, weight, save_mean, save_invstd);
  const bool has_weight = weight.has_value() && weight->defined();
  const BNPenalty pen = parse_batch_norm_penalty(penalty, scale, p, a, knee, penalty_eps, has_weight);
  const at::ScalarType acc = batch_norm_acc_type(input.scalar_type());
  const at::ScalarType param_type = batch_norm_param_type(input, {&weight});
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor grad_input = at::empty_like(input);
  at::Tensor grad_weight = at::empty({s.C}, input.options().dtype(param_type));
  at::Tensor grad_bias = at::empty({s.C}, input.options().dtype(param_type));
  if (s.C == 0) return {grad_input, grad_weight, grad_bias};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "slimcore_batch_norm_backward_cuda",
                                  [&] {
    with_param_type<scalar_t>(param_type, [&](auto param_tag) {
      using param_t = decltype(param_tag);
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* dy = grad_out.const_data_ptr<scalar_t>();
      const scalar_t* x = input.const_data_ptr<scalar_t>();
      scalar_t* dx = grad_input.mutable_data_ptr<scalar_t>();
      const param_t* w = has_weight ? weight->const_data_ptr<param_t>() : nullptr;
      param_t* gw = grad_weight.mutable_data_ptr<param_t>();
      param_t* gb = grad_bias.mutable_data_ptr<param_t>();
      const acc_t* sm = save_mean.const_data_ptr<acc_t>();
      const acc_t* si = save_invstd.const_data_ptr<acc_t>();
      if (s.layout == BNLayout::Planes) {
        planes_backward_kernel<scalar_t, param_t><<<static_cast<unsigned>(s.C), planes_block(s.S), 0, stream>>>(
            dy, x, dx, s.N, s.C, s.S, w, sm, si, training, pen, gw, gb);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        return;
      }
      const int64_t R = s.count();
      const dim3 grid = rows_grid(R, s.C);
      at::Tensor coef = at::empty({3, s.C}, input.options().dtype(acc));
      at::Tensor staging, semaphores;
      if (grid.y > 1) {
        staging = at::empty({2, grid.y, s.C}, input.options().dtype(acc));
        semaphores = at::zeros({grid.x}, input.options().dtype(at::kInt));
      }
      rows_grad_sums_kernel<scalar_t, param_t><<<grid, dim3(kRowsTx, kRowsTy), 0, stream>>>(
          dy, x, R, s.C, w, sm, si, training, pen, gw, gb, coef.mutable_data_ptr<acc_t>(),
          grid.y > 1 ? staging.mutable_data_ptr<acc_t>() : nullptr,
          grid.y > 1 ? semaphores.mutable_data_ptr<int>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      rows_grad_input_kernel<scalar_t><<<rows_elementwise_grid(R, s.C), dim3(kRowsTx, kRowsTy), 0, stream>>>(
          dy, x, dx, R, s.C, sm, coef.const_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(slimcore, CUDA, m) {
  m.impl("batch_norm", &batch_norm_cuda);
  m.impl("batch_norm_backward", &batch_norm_backward_cuda);
}

}  // namespace slimcore
