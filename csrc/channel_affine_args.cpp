#include "channel_affine_args.h"

#include <c10/util/Exception.h>

#include <string>

namespace slimcore {
namespace {

bool is_half(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

void check_vector(const char* name, const at::Tensor& t, const at::Tensor& input, int64_t channels) {
  TORCH_CHECK_VALUE(t.device() == input.device(), "slimcore: channel_affine: ", name, " is on ", t.device(),
                    " but input is on ", input.device());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == channels, "slimcore: channel_affine: ", name, " must have shape [",
                    channels, "] (one value per output channel), got ", t.sizes());
  const at::ScalarType in = input.scalar_type();
  TORCH_CHECK_TYPE(t.scalar_type() == in || (is_half(in) && t.scalar_type() == at::kFloat),
                   "slimcore: channel_affine: ", name, " is ", t.scalar_type(), " but input is ", in, "; ", name,
                   " must have input's dtype (or float32 for float16/bfloat16 input)");
}

}  // namespace

Activation parse_activation(c10::string_view name) {
  if (name == "none") return Activation::None;
  if (name == "relu") return Activation::Relu;
  if (name == "relu6") return Activation::Relu6;
  if (name == "hardswish") return Activation::Hardswish;
  if (name == "silu") return Activation::Silu;
  TORCH_CHECK_VALUE(false, "slimcore: channel_affine: unknown activation '", std::string(name),
                    "'; expected one of none, relu, relu6, hardswish, silu");
}

AffineArgs check_channel_affine_args(const at::Tensor& input, const std::optional<at::Tensor>& index,
                                     const at::Tensor& scale, const at::Tensor& shift, c10::string_view activation,
                                     bool check_index_values) {
  AffineArgs a;
  a.activation = parse_activation(activation);
  TORCH_CHECK_VALUE(input.dim() >= 2, "slimcore: channel_affine: input must have a channel dimension (N, C, ...), "
                    "got shape ", input.sizes());
  const at::ScalarType t = input.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kDouble || is_half(t),
                   "slimcore: channel_affine: input must be float32, float64, float16 or bfloat16, got ", t);
  a.N = input.size(0);
  a.C_in = input.size(1);
  for (int64_t d = 2; d < input.dim(); ++d) a.S *= input.size(d);
  if (input.is_contiguous()) {
    a.layout = a.S == 1 ? AffineLayout::Rows : AffineLayout::Planes;
  } else if (input.dim() == 4 && input.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    a.layout = AffineLayout::Rows;
    a.format = at::MemoryFormat::ChannelsLast;
  } else if (input.dim() == 5 && input.is_contiguous(at::MemoryFormat::ChannelsLast3d)) {
    a.layout = AffineLayout::Rows;
    a.format = at::MemoryFormat::ChannelsLast3d;
  } else {
    TORCH_CHECK_VALUE(false, "slimcore: channel_affine: input must be contiguous (NCHW) or channels_last, got sizes ",
                      input.sizes(), " and strides ", input.strides(),
                      "; call .contiguous() or .contiguous(memory_format=torch.channels_last) first");
  }
  a.C_out = a.C_in;
  if (index.has_value() && index->defined()) {
    const at::Tensor& idx = *index;
    TORCH_CHECK_TYPE(idx.scalar_type() == at::kLong, "slimcore: channel_affine: index must be an int64 (torch.long) "
                     "tensor, got ", idx.scalar_type());
    TORCH_CHECK_VALUE(idx.dim() == 1, "slimcore: channel_affine: index must be 1-D, got shape ", idx.sizes());
    TORCH_CHECK_VALUE(idx.device() == input.device(), "slimcore: channel_affine: index is on ", idx.device(),
                      " but input is on ", input.device());
    a.C_out = idx.size(0);
    if (check_index_values) {
      const at::Tensor host = idx.contiguous();
      const int64_t* v = host.const_data_ptr<int64_t>();
      for (int64_t k = 0; k < a.C_out; ++k) {
        TORCH_CHECK_INDEX(v[k] >= 0 && v[k] < a.C_in, "slimcore: channel_affine: index[", k, "] = ", v[k],
                          " is out of range for the input's ", a.C_in, " channels");
      }
    }
  }
  check_vector("scale", scale, input, a.C_out);
  check_vector("shift", shift, input, a.C_out);
  a.out_sizes = input.sizes().vec();
  a.out_sizes[1] = a.C_out;
  a.acc_type = t == at::kDouble ? at::kDouble : at::kFloat;
  return a;
}

}  // namespace slimcore
