#include "penalty_args.h"

#include <c10/util/Exception.h>

#include <cmath>
#include <string>

namespace slimcore {

PenaltyParams parse_penalty(c10::string_view name, double p, double a, double knee, double eps) {
  PenaltyParams pp{PenaltyKind::L1, p, a, knee, eps};
  if (name == "l1") {
    pp.kind = PenaltyKind::L1;
  } else if (name == "l2") {
    pp.kind = PenaltyKind::L2;
  } else if (name == "lp") {
    pp.kind = PenaltyKind::Lp;
    TORCH_CHECK(p > 0.0 && p < 1.0, "slimcore: Lp penalty needs 0 < p < 1 (use 'l1' for p = 1), got p=", p);
    TORCH_CHECK(eps >= 0.0 && std::isfinite(eps), "slimcore: Lp penalty needs a finite eps >= 0, got eps=", eps);
  } else if (name == "tl1") {
    pp.kind = PenaltyKind::TL1;
    TORCH_CHECK(a > 0.0 && std::isfinite(a), "slimcore: TL1 penalty needs a finite a > 0, got a=", a);
  } else if (name == "scad") {
    pp.kind = PenaltyKind::SCAD;
    TORCH_CHECK(a > 2.0 && std::isfinite(a), "slimcore: SCAD penalty needs a finite a > 2, got a=", a);
    TORCH_CHECK(knee >= 0.0 && std::isfinite(knee), "slimcore: SCAD penalty needs a finite knee (lambda) >= 0, got ",
                knee);
  } else if (name == "mcp") {
    pp.kind = PenaltyKind::MCP;
    TORCH_CHECK(a > 1.0 && std::isfinite(a), "slimcore: MCP penalty needs a finite gamma > 1, got ", a);
    TORCH_CHECK(knee >= 0.0 && std::isfinite(knee), "slimcore: MCP penalty needs a finite knee (lambda) >= 0, got ",
                knee);
  } else {
    TORCH_CHECK(false, "slimcore: unknown penalty '", std::string(name),
                "'; expected one of l1, l2, lp, tl1, scad, mcp");
  }
  return pp;
}

void check_tensor_list(at::TensorList tensors, const char* list_name) {
  if (tensors.empty()) return;
  const auto device = tensors[0].device();
  for (size_t i = 0; i < tensors.size(); ++i) {
    const auto& t = tensors[i];
    TORCH_CHECK(t.defined(), "slimcore: ", list_name, "[", i, "] is undefined (None)");
    TORCH_CHECK(at::isFloatingType(t.scalar_type()), "slimcore: ", list_name, "[", i,
                "] must be floating point (float64/32/16 or bfloat16), got ", t.scalar_type());
    TORCH_CHECK(t.device() == device, "slimcore: ", list_name, " are on mixed devices: ", list_name,
                "[0] is on ", device, " but ", list_name, "[", i, "] is on ", t.device());
    TORCH_CHECK(t.is_contiguous(), "slimcore: ", list_name, "[", i,
                "] must be contiguous (BatchNorm weights always are; got strides ", t.strides(), ")");
  }
}

void check_grads_match(at::TensorList weights, at::TensorList grads) {
  TORCH_CHECK(weights.size() == grads.size(), "slimcore: got ", weights.size(), " weights but ", grads.size(),
              " grads");
  for (size_t i = 0; i < weights.size(); ++i) {
    TORCH_CHECK(grads[i].sizes() == weights[i].sizes(), "slimcore: grads[", i, "] has shape ", grads[i].sizes(),
                " but weights[", i, "] has shape ", weights[i].sizes());
    TORCH_CHECK(grads[i].scalar_type() == weights[i].scalar_type(), "slimcore: grads[", i, "] is ",
                grads[i].scalar_type(), " but weights[", i, "] is ", weights[i].scalar_type());
    TORCH_CHECK(grads[i].device() == weights[i].device(), "slimcore: grads[", i, "] is on ", grads[i].device(),
                " but weights[", i, "] is on ", weights[i].device());
  }
}

std::vector<double> expand_scales(c10::ArrayRef<double> scale, size_t num_tensors, const char* what) {
  TORCH_CHECK(scale.size() == 1 || scale.size() == num_tensors, "slimcore: ", what,
              " must have 1 entry or one per tensor (", num_tensors, "), got ", scale.size());
  for (double s : scale) {
    TORCH_CHECK(std::isfinite(s) && s >= 0.0, "slimcore: ", what, " must be finite and >= 0, got ", s);
  }
  if (scale.size() == num_tensors) return std::vector<double>(scale.begin(), scale.end());
  return std::vector<double>(num_tensors, scale[0]);
}

}  // namespace slimcore
