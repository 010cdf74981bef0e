// Argument checking shared by the CPU and CUDA kernels of the penalty ops, so both backends
// reject bad input with the same message.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/string_view.h>

#include <vector>

#include "penalties.h"

namespace slimcore {

// Parses the penalty name ("l1", "l2", "lp", "tl1", "scad", "mcp") and checks its parameters.
PenaltyParams parse_penalty(c10::string_view name, double p, double a, double knee, double eps);

// Checks a list of tensors the ops read or write: floating point, contiguous, all on one device.
void check_tensor_list(at::TensorList tensors, const char* list_name);

// Checks that grads[i] matches weights[i] in shape, dtype and device.
void check_grads_match(at::TensorList weights, at::TensorList grads);

// Expands a per-tensor scale list (length 1 or len(tensors)) and checks it is finite and >= 0.
std::vector<double> expand_scales(c10::ArrayRef<double> scale, size_t num_tensors, const char* what);

}  // namespace slimcore
