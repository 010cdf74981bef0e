#include "channel_gather_args.h"

#include <c10/util/Exception.h>

namespace slimcore {
namespace {

// Checks one index tensor against dimension `dim` of the weight (strictly increasing for the
// in-place op) and returns its contiguous CPU copy.
at::Tensor check_index(const char* op, const char* name, const at::Tensor& index, const at::Tensor& weight,
                       int64_t dim, bool in_place) {
  TORCH_CHECK_TYPE(index.scalar_type() == at::kLong, "slimcore: ", op, ": ", name,
                   " must be an int64 (torch.long) tensor, got ", index.scalar_type());
  TORCH_CHECK_VALUE(index.dim() == 1, "slimcore: ", op, ": ", name, " must be 1-D, got shape ", index.sizes());
  TORCH_CHECK_VALUE(index.device() == weight.device(), "slimcore: ", op, ": ", name, " is on ", index.device(),
                    " but weight is on ", weight.device());
  const at::Tensor host = index.is_cpu() ? index.contiguous() : index.to(at::kCPU).contiguous();
  const int64_t* v = host.const_data_ptr<int64_t>();
  const int64_t n = host.numel();
  const int64_t size = weight.size(dim);
  for (int64_t k = 0; k < n; ++k) {
    TORCH_CHECK_INDEX(v[k] >= 0 && v[k] < size, "slimcore: ", op, ": ", name, "[", k, "] = ", v[k],
                      " is out of range for dimension ", dim, " of weight (size ", size, ")");
    if (in_place && k > 0) {
      TORCH_CHECK_VALUE(v[k] > v[k - 1], "slimcore: ", op, ": ", name,
                        " must be strictly increasing (sorted, no duplicates) for the in-place gather, but ", name,
                        "[", k, "] = ", v[k], " follows ", name, "[", k - 1, "] = ", v[k - 1],
                        "; use channel_gather for any order");
    }
  }
  return host;
}

}  // namespace

int64_t GatherArgs::source_position(int64_t p) const {
  const int64_t row_len = out_cols * inner;
  const int64_t r = p / row_len;
  const int64_t rem = p - r * row_len;
  const int64_t j = rem / inner;
  const int64_t k = rem - j * inner;
  const int64_t o = out_host.defined() ? out_host.const_data_ptr<int64_t>()[r] : r;
  const int64_t i = in_host.defined() ? in_host.const_data_ptr<int64_t>()[j] : j;
  return (o * cols + i) * inner + k;
}

GatherArgs check_gather_args(const char* op, const at::Tensor& weight, const std::optional<at::Tensor>& out_index,
                             const std::optional<at::Tensor>& in_index, bool in_place) {
  TORCH_CHECK_VALUE(weight.dim() >= 1, "slimcore: ", op, ": weight must have at least 1 dimension, got a 0-d tensor");
  // Checked before anything moves (resize_ would refuse only after the values were compacted).
  TORCH_CHECK_VALUE(!in_place || !weight.requires_grad(), "slimcore: ", op,
                    ": weight requires grad and cannot be resized in place; gather param.data and assign "
                    "param.data = result");
  TORCH_CHECK_VALUE(weight.is_contiguous(), "slimcore: ", op, ": weight must be contiguous (got sizes ",
                    weight.sizes(), ", strides ", weight.strides(),
                    "); a channels_last or transposed weight needs .contiguous() first");
  const bool has_in = in_index.has_value() && in_index->defined();
  TORCH_CHECK_VALUE(!has_in || weight.dim() >= 2, "slimcore: ", op,
                    ": in_index must be None for a 1-D weight (it has no input-channel dimension)");

  GatherArgs args;
  args.rows = weight.size(0);
  args.cols = weight.dim() >= 2 ? weight.size(1) : 1;
  args.inner = 1;
  for (int64_t d = 2; d < weight.dim(); ++d) args.inner *= weight.size(d);
  args.out_rows = args.rows;
  args.out_cols = args.cols;
  args.out_sizes = weight.sizes().vec();
  if (out_index.has_value() && out_index->defined()) {
    args.out_host = check_index(op, "out_index", *out_index, weight, 0, in_place);
    args.out_rows = args.out_host.numel();
    args.out_sizes[0] = args.out_rows;
  }
  if (has_in) {
    args.in_host = check_index(op, "in_index", *in_index, weight, 1, in_place);
    args.out_cols = args.in_host.numel();
    args.out_sizes[1] = args.out_cols;
  }
  return args;
}

}  // namespace slimcore
