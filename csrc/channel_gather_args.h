// Argument checking and geometry shared by the CPU and CUDA kernels of channel_gather and
// channel_gather_, so both backends reject bad input with the same message (the same messages as
// slimcore/reference.py).
//
// Every weight is viewed as a contiguous (rows, cols, inner) array: rows = size(0) (output
// channels), cols = size(1) (input channels; 1 for a 1-D weight), inner = the product of the
// remaining sizes (kernel elements; 1 for Linear and 1-D weights). The gathered tensor is the
// contiguous (out_rows, out_cols, inner) array whose element (r, j, k) is weight[o(r), i(j), k],
// with o = out_index (identity when None) and i = in_index (identity when None).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace slimcore {

struct GatherArgs {
  int64_t rows = 0, cols = 1, inner = 1;  // the weight as (rows, cols, inner)
  int64_t out_rows = 0, out_cols = 1;     // kept rows and cols
  std::vector<int64_t> out_sizes;         // the gathered tensor's shape
  // Contiguous int64 CPU copies of the index tensors (undefined when None); for a CPU index this
  // is the index itself (or a contiguous copy of a strided one).
  at::Tensor out_host, in_host;

  int64_t out_numel() const { return out_rows * out_cols * inner; }
  // Linear position in the weight of the element that lands at linear position p of the
  // gathered tensor. Needs the host copies (host code only).
  int64_t source_position(int64_t p) const;
};

// Checks weight and both index tensors for op `op` ("channel_gather" or "channel_gather_"):
// weight has >= 1 dimension and is contiguous; each index is int64, 1-D, on weight's device, and
// every value lies in [0, size of its dimension); in_index is None for a 1-D weight. With
// `in_place` (channel_gather_), each index is also strictly increasing and weight must not require
// grad. CUDA indices are copied to the host for the value checks (one synchronisation per index).
GatherArgs check_gather_args(const char* op, const at::Tensor& weight, const std::optional<at::Tensor>& out_index,
                             const std::optional<at::Tensor>& in_index, bool in_place);

// The gather only moves elements, never looks at their values, so the kernels are instantiated per
// element size rather than per dtype: one instantiation serves float32, int32 and complex32 alike,
// and every dtype works (floating, integer, bool, complex, float8).
struct alignas(16) Bytes16 {
  uint64_t lo, hi;
};

// Calls f(T{}) with T an unsigned integer type (or Bytes16) of t's element size.
template <typename F>
void dispatch_by_element_size(const char* op, const at::Tensor& t, F&& f) {
  switch (t.element_size()) {
    case 1: f(uint8_t{}); break;
    case 2: f(uint16_t{}); break;
    case 4: f(uint32_t{}); break;
    case 8: f(uint64_t{}); break;
    case 16: f(Bytes16{}); break;
    default: TORCH_CHECK_TYPE(false, "slimcore: ", op, ": unsupported dtype ", t.scalar_type(), " (element size ",
                              t.element_size(), " bytes)");
  }
}

}  // namespace slimcore
