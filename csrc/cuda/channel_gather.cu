// CUDA kernels of slimcore::channel_gather (out of place) and slimcore::channel_gather_ (in place).
// One thread per output element (grid-stride): out[p] = weight[source_position(p)], with the
// weight viewed as (rows, cols, inner) (channel_gather_args.h). Index math is 32-bit with
// multiply-high division (IntDivider) when every position fits, 64-bit otherwise.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/detail/IntegerDivider.cuh>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "../channel_gather_args.h"

namespace slimcore {
namespace {

constexpr int kBlockSize = 256;

template <typename index_t>
struct DeviceGeometry {
  at::cuda::detail::IntDivider<index_t> row_len;  // out_cols * inner
  at::cuda::detail::IntDivider<index_t> inner;
  index_t src_row_len;         // cols * inner
  index_t inner_size;          // inner
  const int64_t* out_index;    // device pointer; nullptr keeps every row
  const int64_t* in_index;     // device pointer; nullptr keeps every col
};

template <typename index_t>
__device__ __forceinline__ index_t source_position(const DeviceGeometry<index_t>& g, index_t p) {
  const auto rc = g.row_len.divmod(p);      // output row r, offset c in it
  const auto jk = g.inner.divmod(rc.mod);   // output col j, inner offset k
  const index_t o = g.out_index != nullptr ? static_cast<index_t>(g.out_index[rc.div]) : rc.div;
  const index_t i = g.in_index != nullptr ? static_cast<index_t>(g.in_index[jk.div]) : jk.div;
  return o * g.src_row_len + i * g.inner_size + jk.mod;
}

// dst[p - dst_offset] = src[source_position(p)] for p in [begin, end). src and dst may be the same
// buffer (an in-place wave, whose reads and writes are disjoint), hence no __restrict__.
template <typename T, typename index_t>
__global__ void __launch_bounds__(kBlockSize)
    gather_kernel(const T* src, T* dst, index_t begin, index_t end, index_t dst_offset,
                  const DeviceGeometry<index_t> g) {
  const index_t stride = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t p = begin + static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < end; p += stride) {
    dst[p - dst_offset] = src[source_position(g, p)];
  }
}

// Everything a launch needs besides the range.
struct Launcher {
  const GatherArgs& args;
  const int64_t* out_index;  // device pointers or nullptr
  const int64_t* in_index;
  bool index32;              // every position (source and output) fits in 31 bits
  int max_blocks;
  cudaStream_t stream;

  template <typename T, typename index_t>
  void launch_as(const T* src, T* dst, int64_t begin, int64_t end, int64_t dst_offset) const {
    DeviceGeometry<index_t> g{at::cuda::detail::IntDivider<index_t>(static_cast<index_t>(args.out_cols * args.inner)),
                              at::cuda::detail::IntDivider<index_t>(static_cast<index_t>(args.inner)),
                              static_cast<index_t>(args.cols * args.inner), static_cast<index_t>(args.inner),
                              out_index, in_index};
    const int64_t blocks = std::min<int64_t>((end - begin + kBlockSize - 1) / kBlockSize, max_blocks);
    gather_kernel<T, index_t><<<static_cast<int>(blocks), kBlockSize, 0, stream>>>(
        src, dst, static_cast<index_t>(begin), static_cast<index_t>(end), static_cast<index_t>(dst_offset), g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <typename T>
  void operator()(const T* src, T* dst, int64_t begin, int64_t end, int64_t dst_offset) const {
    if (end <= begin) return;
    if (index32) {
      launch_as<T, uint32_t>(src, dst, begin, end, dst_offset);
    } else {
      launch_as<T, uint64_t>(src, dst, begin, end, dst_offset);
    }
  }
};

Launcher make_launcher(const GatherArgs& args, const at::Tensor& weight, const at::Tensor& out_dev,
                       const at::Tensor& in_dev) {
  int device = 0, sms = 0, threads_per_sm = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&threads_per_sm, cudaDevAttrMaxThreadsPerMultiProcessor, device));
  const int64_t largest = std::max(weight.numel(), args.out_numel());
  return Launcher{args,
                  out_dev.defined() ? out_dev.const_data_ptr<int64_t>() : nullptr,
                  in_dev.defined() ? in_dev.const_data_ptr<int64_t>() : nullptr,
                  largest <= std::numeric_limits<int32_t>::max(),
                  sms * std::max(1, threads_per_sm / kBlockSize),  // one full wave of resident blocks
                  c10::cuda::getCurrentCUDAStream().stream()};
}

at::Tensor device_index(const std::optional<at::Tensor>& index) {
  return index.has_value() && index->defined() ? index->contiguous() : at::Tensor();
}

at::Tensor channel_gather_cuda(const at::Tensor& weight, const std::optional<at::Tensor>& out_index,
                               const std::optional<at::Tensor>& in_index) {
  const GatherArgs args = check_gather_args("channel_gather", weight, out_index, in_index, false);
  const c10::cuda::CUDAGuard guard(weight.device());
  at::Tensor out = at::empty(args.out_sizes, weight.options());
  const int64_t n = args.out_numel();
  if (n == 0) return out;
  const at::Tensor out_dev = device_index(out_index);
  const at::Tensor in_dev = device_index(in_index);
  const Launcher launch = make_launcher(args, weight, out_dev, in_dev);
  dispatch_by_element_size("channel_gather", weight, [&](auto tag) {
    using T = decltype(tag);
    launch(static_cast<const T*>(weight.const_data_ptr()), static_cast<T*>(out.mutable_data_ptr()), 0, n, 0);
  });
  return out;
}

// Staged chunks of the in-place gather hold at most this many elements in a scratch buffer:
// an eighth of the gathered tensor, but at least 2^16 and at most 2^22 elements.
int64_t stage_elements(int64_t n) {
  return std::min<int64_t>(int64_t{1} << 22, std::max<int64_t>(int64_t{1} << 16, (n + 7) / 8));
}

// In place, on the current stream. With strictly increasing indices the element landing at output
// position p comes from source_position(p) >= p, and gap(p) = source_position(p) - p never
// decreases with p (see cpu/channel_gather.cpp). Positions with gap 0 (a prefix) stay put. From
// the first moved position s, front to back:
//   * direct wave: if gap(s) >= min(stage, n - s), one launch moves [s, e), e = min(n, s + gap(s)):
//     it writes only below e and reads only at or above source_position(s) >= e, all still
//     unwritten, so its threads may run in any order;
//   * staged chunk: otherwise (a small gap would make a direct wave short) one launch gathers
//     [s, s + stage) into a scratch buffer (it reads at or above s, still unwritten) and a
//     device-to-device copy puts it in place.
// Direct waves (except the last) and staged chunks (except the last) each cover >= stage
// elements, so the worst case is 2 * ceil(n / stage) launches: 16 up to 2^25 gathered elements,
// 2 * ceil(n / 2^22) beyond (50 for all of VGG-16's 4096 x 25088 fc6 weight). A pure
// wave scheme would need one launch per element when the gap is 1 (a 1-D weight losing its first
// channel). The scratch buffer (<= n / 8 elements beyond 2^19) is the only extra memory: the
// weight is never held twice.
at::Tensor channel_gather__cuda(const at::Tensor& weight, const std::optional<at::Tensor>& out_index,
                                const std::optional<at::Tensor>& in_index) {
  const GatherArgs args = check_gather_args("channel_gather_", weight, out_index, in_index, true);
  const int64_t n = args.out_numel();
  if (n > 0) {
    const c10::cuda::CUDAGuard guard(weight.device());
    const at::Tensor out_dev = device_index(out_index);
    const at::Tensor in_dev = device_index(in_index);
    const Launcher launch = make_launcher(args, weight, out_dev, in_dev);
    const auto gap = [&](int64_t p) { return args.source_position(p) - p; };
    int64_t lo = 0, hi = n;  // first moved position: gap is non-decreasing
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (gap(mid) > 0) {
        hi = mid;
      } else {
        lo = mid + 1;
      }
    }
    const int64_t stage = stage_elements(n);
    dispatch_by_element_size("channel_gather_", weight, [&](auto tag) {
      using T = decltype(tag);
      T* w = static_cast<T*>(weight.mutable_data_ptr());
      at::Tensor scratch;
      for (int64_t s = lo; s < n;) {
        const int64_t g = gap(s);
        if (g >= std::min(stage, n - s)) {
          const int64_t e = std::min(n, s + g);
          launch(w, w, s, e, 0);
          s = e;
        } else {
          const int64_t e = std::min(n, s + stage);
          if (!scratch.defined()) scratch = at::empty({e - s}, weight.options());
          T* buffer = static_cast<T*>(scratch.mutable_data_ptr());
          launch(static_cast<const T*>(w), buffer, s, e, s);
          C10_CUDA_CHECK(cudaMemcpyAsync(w + s, buffer, (e - s) * sizeof(T), cudaMemcpyDeviceToDevice,
                                         launch.stream));
          s = e;
        }
      }
    });
  }
  weight.resize_(args.out_sizes);
  return weight;
}

}  // namespace

TORCH_LIBRARY_IMPL(slimcore, CUDA, m) {
  m.impl("channel_gather", &channel_gather_cuda);
  m.impl("channel_gather_", &channel_gather__cuda);
}

}  // namespace slimcore
