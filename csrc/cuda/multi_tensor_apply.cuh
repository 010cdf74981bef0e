// One kernel launch over a list of tensors (apex's multi-tensor-apply pattern, written for slimcore).
//
// The host packs pointers, sizes and per-tensor scales into a struct passed by value as a kernel
// argument; each block looks up which tensor and which chunk of it to process. The struct is
// ~14 KB: CUDA >= 12.1 allows kernel arguments up to 32,764 bytes on Volta and newer, which lets
// one launch cover 256 tensors (all BN layers of densenet121 or ResNet-164) instead of the
// classic 4 KB limit's ~48. More tensors or blocks than fit simply take further launches.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <utility>
#include <vector>

namespace slimcore {
namespace cuda {

constexpr int kBlockSize = 256;
constexpr int64_t kChunkSize = 16384;  // elements per block

template <int kDepth>
struct TensorListMeta {
  static constexpr int kMaxTensors = 256;
  static constexpr int kMaxBlocks = 1024;
  void* addresses[kDepth][kMaxTensors];
  int64_t numel[kMaxTensors];
  double scale[kMaxTensors];
  uint16_t block_to_tensor[kMaxBlocks];
  int32_t block_to_chunk[kMaxBlocks];
};
static_assert(sizeof(TensorListMeta<2>) + 64 <= 32764, "kernel argument exceeds CUDA's 32,764-byte limit");

// Indices of `tensors` grouped by dtype: each launch handles one scalar type.
inline std::vector<std::pair<at::ScalarType, std::vector<size_t>>> group_by_dtype(at::TensorList tensors) {
  std::vector<std::pair<at::ScalarType, std::vector<size_t>>> groups;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const auto dtype = tensors[i].scalar_type();
    auto it = groups.begin();
    while (it != groups.end() && it->first != dtype) ++it;
    if (it == groups.end()) {
      groups.emplace_back(dtype, std::vector<size_t>{});
      it = groups.end() - 1;
    }
    it->second.push_back(i);
  }
  return groups;
}

// Fills TensorListMeta<kDepth> for tensors lists[0..kDepth)[indices] and calls
// launch(meta, num_blocks) as often as the metadata fills up (once for typical models).
template <int kDepth, typename Launch>
void multi_tensor_apply(const std::vector<at::TensorList>& lists, const std::vector<size_t>& indices,
                        const std::vector<double>& scales, Launch&& launch) {
  using Meta = TensorListMeta<kDepth>;
  TORCH_INTERNAL_ASSERT(lists.size() == static_cast<size_t>(kDepth));
  Meta meta;
  int slot = 0;
  int blocks = 0;
  for (size_t t : indices) {
    const int64_t n = lists[0][t].numel();
    if (n == 0) continue;
    for (int d = 0; d < kDepth; ++d) meta.addresses[d][slot] = const_cast<void*>(lists[d][t].const_data_ptr());
    meta.numel[slot] = n;
    meta.scale[slot] = scales[t];
    const int64_t chunks = (n + kChunkSize - 1) / kChunkSize;
    for (int64_t c = 0; c < chunks; ++c) {
      meta.block_to_tensor[blocks] = static_cast<uint16_t>(slot);
      meta.block_to_chunk[blocks] = static_cast<int32_t>(c);
      ++blocks;
      const bool last_chunk = c + 1 == chunks;
      if (blocks == Meta::kMaxBlocks || (last_chunk && slot + 1 == Meta::kMaxTensors)) {
        launch(meta, blocks);
        blocks = 0;
        if (last_chunk) {
          slot = -1;  // the next tensor starts at slot 0
        } else {      // the rest of this tensor continues in slot 0
          for (int d = 0; d < kDepth; ++d) meta.addresses[d][0] = meta.addresses[d][slot];
          meta.numel[0] = meta.numel[slot];
          meta.scale[0] = meta.scale[slot];
          slot = 0;
        }
      }
    }
    ++slot;
  }
  if (blocks > 0) launch(meta, blocks);
}

#ifdef __CUDACC__  // the packing above is plain host code, tested by tests/cpp without a GPU
// Element range [begin, end) of the chunk this block owns.
template <typename Meta>
__device__ __forceinline__ void block_chunk(const Meta& meta, int& tensor, int64_t& begin, int64_t& end) {
  tensor = meta.block_to_tensor[blockIdx.x];
  begin = static_cast<int64_t>(meta.block_to_chunk[blockIdx.x]) * kChunkSize;
  end = begin + kChunkSize < meta.numel[tensor] ? begin + kChunkSize : meta.numel[tensor];
}
#endif

}  // namespace cuda
}  // namespace slimcore
