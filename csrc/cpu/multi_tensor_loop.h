// CPU counterpart of cuda/multi_tensor_apply.cuh: one at::parallel_for over the concatenated
// index space of a list of tensors, so a whole model's BN layers form a single parallel pass.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace slimcore {
namespace cpu {

// Calls f(tensor_index, begin, end) over half-open element ranges that together cover every
// element of every tensor exactly once. Ranges may run on different threads, each task holding
// at least `grain` elements (cost_model.h: sized by time, so a small list runs on one thread).
template <typename F>
void for_each_range(at::TensorList tensors, int64_t grain, F&& f) {
  std::vector<int64_t> offsets(tensors.size() + 1, 0);
  for (size_t i = 0; i < tensors.size(); ++i) offsets[i + 1] = offsets[i] + tensors[i].numel();
  const int64_t total = offsets.back();
  if (total == 0) return;
  at::parallel_for(0, total, grain, [&](int64_t begin, int64_t end) {
    // Last tensor whose first element is <= begin; empty tensors are skipped below.
    size_t t = std::upper_bound(offsets.begin(), offsets.end(), begin) - offsets.begin() - 1;
    while (begin < end) {
      const int64_t stop = std::min(end, offsets[t + 1]);
      if (stop > begin) f(t, begin - offsets[t], stop - offsets[t]);
      begin = stop;
      ++t;
    }
  });
}

}  // namespace cpu
}  // namespace slimcore
