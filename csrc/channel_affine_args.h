// Argument checking and geometry shared by the CPU and CUDA kernels of slimcore::channel_affine,
// so both backends accept the same inputs and reject bad ones with the same messages (the same as
// slimcore/reference.py's check_channel_affine).
//
//   out[n, c, ...] = act(input[n, i(c), ...] * scale[c] + shift[c])
//
// with i = index (identity when None): an eval-mode BatchNorm (scale = gamma / sqrt(var + eps),
// shift = beta - mean * scale) over a selection of its input channels, and the activation that
// reads it, in one pass. The input is read in its own layout, never copied:
//   Planes  contiguous (N, C, S...) with S = prod(sizes[2:]) > 1: runs of S values per (n, c);
//   Rows    N*S rows of C channels: channels_last / channels_last_3d, or any input with S == 1.
// The output has the input's layout.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/MemoryFormat.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace slimcore {

// The activations the op fuses; "none" keeps the affine map alone.
enum class Activation { None, Relu, Relu6, Hardswish, Silu };

enum class AffineLayout { Planes, Rows };

struct AffineArgs {
  int64_t N = 0, C_in = 0, C_out = 0, S = 1;
  AffineLayout layout = AffineLayout::Planes;
  Activation activation = Activation::None;
  at::MemoryFormat format = at::MemoryFormat::Contiguous;  // the output's
  std::vector<int64_t> out_sizes;
  at::ScalarType acc_type = at::kFloat;  // float64 for float64 input, float32 otherwise

  int64_t out_numel() const { return N * C_out * S; }
};

// Parses "none", "relu", "relu6", "hardswish", "silu" (errors name the accepted ones).
Activation parse_activation(c10::string_view name);

// Checks every argument and returns the geometry: input floating point with >= 2 dims, in one of
// the two layouts; index int64 1-D on input's device (None: every channel, in order); scale and
// shift 1-D with one value per output channel, on input's device, of input's dtype (or float32
// for float16/bfloat16 input). With `check_index_values`, every index value lies in [0, C_in)
// (the CPU kernel; the CUDA kernel asserts it on the device rather than synchronise every call).
AffineArgs check_channel_affine_args(const at::Tensor& input, const std::optional<at::Tensor>& index,
                                     const at::Tensor& scale, const at::Tensor& shift, c10::string_view activation,
                                     bool check_index_values);

}  // namespace slimcore
