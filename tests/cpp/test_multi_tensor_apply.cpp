// Host-side test of csrc/cuda/multi_tensor_apply.cuh: the packing of tensors and chunks into
// launches is plain C++, so it is checked here without a GPU. Every (tensor, chunk) must be
// launched exactly once, with the right addresses, size and scale, across metadata overflows
// (more than 256 tensors, more than 1024 blocks, a tensor split across launches).
#include <ATen/ATen.h>

#include <cstdio>
#include <map>
#include <set>
#include <utility>
#include <vector>

#include "cuda/multi_tensor_apply.cuh"

using slimcore::cuda::kChunkSize;
using slimcore::cuda::TensorListMeta;

namespace {

int failures = 0;

void expect(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "FAIL: %s\n", what);
    ++failures;
  }
}

template <int kDepth>
void check_packing(const std::vector<at::TensorList>& lists, const std::vector<size_t>& indices) {
  std::vector<double> scales;
  std::map<const void*, size_t> index_of;  // first list's data pointer -> tensor index
  for (size_t t = 0; t < lists[0].size(); ++t) {
    scales.push_back(0.5 + static_cast<double>(t));
    if (lists[0][t].numel() > 0) index_of[lists[0][t].const_data_ptr()] = t;
  }
  std::set<std::pair<size_t, int64_t>> seen;
  int launches = 0;
  bool meta_ok = true;
  slimcore::cuda::multi_tensor_apply<kDepth>(lists, indices, scales, [&](const TensorListMeta<kDepth>& meta, int blocks) {
    ++launches;
    meta_ok = meta_ok && blocks > 0 && blocks <= TensorListMeta<kDepth>::kMaxBlocks;
    for (int b = 0; b < blocks; ++b) {
      const int slot = meta.block_to_tensor[b];
      meta_ok = meta_ok && slot < TensorListMeta<kDepth>::kMaxTensors;
      const auto it = index_of.find(meta.addresses[0][slot]);
      if (it == index_of.end()) {
        meta_ok = false;
        continue;
      }
      const size_t t = it->second;
      for (int d = 0; d < kDepth; ++d) meta_ok = meta_ok && meta.addresses[d][slot] == lists[d][t].const_data_ptr();
      meta_ok = meta_ok && meta.numel[slot] == lists[0][t].numel() && meta.scale[slot] == scales[t];
      const int64_t chunk = meta.block_to_chunk[b];
      meta_ok = meta_ok && chunk * kChunkSize < lists[0][t].numel();
      meta_ok = meta_ok && seen.insert({t, chunk}).second;  // never launched twice
    }
  });
  expect(meta_ok, "every block maps to a valid slot, tensor, address, size, scale and chunk, once");
  size_t expected = 0;
  for (size_t t : indices) expected += (lists[0][t].numel() + kChunkSize - 1) / kChunkSize;
  expect(seen.size() == expected, "every chunk of every selected tensor is launched");
  expect(launches >= 2, "the case overflows the metadata into several launches");
}

}  // namespace

int main() {
  // 600 small tensors (some empty) + a 5-chunk tensor + one tensor of more than 1024 chunks
  // (uninitialised memory: only pointers and sizes are read).
  std::vector<at::Tensor> weights, grads;
  for (int i = 0; i < 600; ++i) {
    weights.push_back(at::empty({(i * 37) % 211}));
    grads.push_back(at::empty({(i * 37) % 211}));
  }
  weights.push_back(at::empty({5 * kChunkSize - 3}));
  grads.push_back(at::empty({5 * kChunkSize - 3}));
  weights.push_back(at::empty({1100 * kChunkSize + 7}));
  grads.push_back(at::empty({1100 * kChunkSize + 7}));

  std::vector<size_t> all(weights.size());
  for (size_t i = 0; i < all.size(); ++i) all[i] = i;
  check_packing<1>({weights}, all);
  check_packing<2>({weights, grads}, all);

  // A dtype group is a subset of indices.
  std::vector<size_t> odd;
  for (size_t i = 1; i < all.size(); i += 2) odd.push_back(i);
  check_packing<2>({weights, grads}, odd);

  if (failures == 0) std::printf("test_multi_tensor_apply: all checks passed\n");
  return failures == 0 ? 0 : 1;
}
