// Estimated single-thread cost per element of the penalty ops, for cost_model.h's task size
// (rough: a sign or a threshold is ~0.5 ns, pow/arccos tens to hundreds; double costs about the
// same, the math is done in float32/float64 either way).
#pragma once

#include "../penalties.h"
#include "cost_model.h"

namespace slimcore {
namespace cpu {

enum class PenaltyOp { Subgradient, Prox, Value };

inline double penalty_ns_per_element(PenaltyOp op, const PenaltyParams& pp) {
  switch (op) {
    case PenaltyOp::Subgradient:  // a sign or a division, read-modify-write of the gradient
      return pp.kind == PenaltyKind::Lp ? 6.0 : 0.5;
    case PenaltyOp::Value:  // serial double accumulation; Lp/TL1 need pow/division
      return pp.kind == PenaltyKind::Lp ? 6.0 : 1.0;
    case PenaltyOp::Prox:
      switch (pp.kind) {
        case PenaltyKind::TL1:
          return 30.0;  // float64 arccos and cos
        case PenaltyKind::Lp:
          return 200.0;  // closed forms with arccos/cosh; general p iterates (GST)
        default:
          return 0.5;  // thresholding
      }
  }
  return 1.0;
}

inline int64_t penalty_grain(PenaltyOp op, const PenaltyParams& pp) { return grain_for(penalty_ns_per_element(op, pp)); }

}  // namespace cpu
}  // namespace slimcore
