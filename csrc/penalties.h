// The sparsity penalties g(x) on BatchNorm scaling factors: value, subgradient and proximal operator.
//
// One definition of the math, shared by the CPU and CUDA kernels (every function is host+device).
// Formulas and their verification: docs/penalties.md. The pure-PyTorch twin of this file is
// slimcore/reference.py; tests compare the two and both against a brute-force argmin.
//
// Conventions (penalties.md §0, §8):
//   * every g is even, so the subgradient is odd and the prox keeps the sign of its input;
//   * the subgradient at x = 0 is 0 (0 lies in every subdifferential here);
//   * thresholds are strict: prox(v) = 0 when |v| <= thr;
//   * NaN/Inf inputs propagate: the subgradient of NaN is NaN and prox(non-finite v) = v,
//     so a diverged run stays visibly diverged instead of being silently repaired.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

namespace slimcore {

enum class PenaltyKind : int32_t { L1 = 0, L2, Lp, TL1, SCAD, MCP };

// Shape parameters; each penalty reads the ones it needs.
//   Lp:   p in (0, 1); eps >= 0 bounds the subgradient near 0: p*sign(x)*(|x|+eps)^(p-1), the
//         derivative of the smoothed value (|x|+eps)^p - eps^p. The prox uses the exact |x|^p.
//   TL1:  a > 0.
//   SCAD: a > 2, knee = the SCAD lambda (slope at 0, knees at knee and a*knee).
//   MCP:  a = gamma_M > 1, knee = the MCP lambda.
struct PenaltyParams {
  PenaltyKind kind;
  double p;
  double a;
  double knee;
  double eps;
};

namespace detail {

template <typename T>
C10_HOST_DEVICE inline T sign_of(T x) {
  return static_cast<T>((x > T(0)) - (x < T(0)));
}

template <typename T>
C10_HOST_DEVICE inline T clamp_to(T x, T lo, T hi) {
  return x < lo ? lo : (x > hi ? hi : x);
}

template <typename T>
C10_HOST_DEVICE inline T max_of(T x, T y) {
  return x > y ? x : y;
}

template <typename T>
C10_HOST_DEVICE constexpr T machine_epsilon() {
  return sizeof(T) == sizeof(double) ? T(2.220446049250313e-16) : T(1.1920928955078125e-07);
}

template <typename T>
C10_HOST_DEVICE inline bool is_nan(T x) {
  return x != x;
}

template <typename T>
C10_HOST_DEVICE inline bool is_finite(T x) {
  // True for finite values only; false for NaN (comparison fails) and +-Inf.
  return (x - x) == (x - x);
}

// SCAD penalty p(u) for u = |x| >= 0 (Fan & Li 2001).
template <typename T>
C10_HOST_DEVICE inline T scad_value_abs(T u, T a, T lam) {
  if (u <= lam) return lam * u;
  if (u <= a * lam) return (T(2) * a * lam * u - u * u - lam * lam) / (T(2) * (a - T(1)));
  return (a + T(1)) * lam * lam / T(2);
}

// MCP penalty p(u) for u = |x| >= 0 (Zhang 2010), gamma = a.
template <typename T>
C10_HOST_DEVICE inline T mcp_value_abs(T u, T a, T lam) {
  if (u <= a * lam) return lam * u - u * u / (T(2) * a);
  return a * lam * lam / T(2);
}

}  // namespace detail

// ---------------------------------------------------------------------------------------------
// g(x)
template <PenaltyKind K, typename T>
C10_HOST_DEVICE inline T penalty_value(T x, const PenaltyParams& pp) {
  using std::pow;
  const T u = std::abs(x);
  if constexpr (K == PenaltyKind::L1) {
    return u;
  } else if constexpr (K == PenaltyKind::L2) {
    return x * x;
  } else if constexpr (K == PenaltyKind::Lp) {
    // Smoothed (|x|+eps)^p - eps^p: its derivative is exactly the eps-shifted subgradient below.
    const T p = static_cast<T>(pp.p);
    const T eps = static_cast<T>(pp.eps);
    return pow(u + eps, p) - pow(eps, p);
  } else if constexpr (K == PenaltyKind::TL1) {
    const T a = static_cast<T>(pp.a);
    return (a + T(1)) * u / (a + u);
  } else if constexpr (K == PenaltyKind::SCAD) {
    if (detail::is_nan(x)) return x;
    return detail::scad_value_abs(u, static_cast<T>(pp.a), static_cast<T>(pp.knee));
  } else {
    static_assert(K == PenaltyKind::MCP, "unhandled penalty");
    if (detail::is_nan(x)) return x;
    return detail::mcp_value_abs(u, static_cast<T>(pp.a), static_cast<T>(pp.knee));
  }
}

// ---------------------------------------------------------------------------------------------
// An element of the subdifferential of g at x (0 at x = 0, NaN at NaN).
// Written as compute-then-select, without early returns, so CPU loops vectorise (L1/L2/TL1/SCAD/MCP).
template <PenaltyKind K, typename T>
C10_HOST_DEVICE inline T penalty_subgradient(T x, const PenaltyParams& pp) {
  using std::pow;
  const T s = detail::sign_of(x);
  const T u = std::abs(x);
  T d;
  if constexpr (K == PenaltyKind::L1) {
    d = s;
  } else if constexpr (K == PenaltyKind::L2) {
    d = T(2) * x;
  } else if constexpr (K == PenaltyKind::Lp) {
    // eps-shifted form, bounded by p*eps^(p-1); x = 0 must give 0, not 0 * inf.
    const T p = static_cast<T>(pp.p);
    const T grad = p * pow(u + static_cast<T>(pp.eps), p - T(1));
    d = x == T(0) ? T(0) : s * grad;
  } else if constexpr (K == PenaltyKind::TL1) {
    const T a = static_cast<T>(pp.a);
    const T denom = a + u;
    d = s * a * (a + T(1)) / (denom * denom);
  } else if constexpr (K == PenaltyKind::SCAD) {
    const T a = static_cast<T>(pp.a);
    const T lam = static_cast<T>(pp.knee);
    d = s * (u <= lam ? lam : detail::max_of(a * lam - u, T(0)) / (a - T(1)));
  } else {
    static_assert(K == PenaltyKind::MCP, "unhandled penalty");
    const T a = static_cast<T>(pp.a);
    const T lam = static_cast<T>(pp.knee);
    d = s * detail::max_of(lam - u / a, T(0));
  }
  return detail::is_nan(x) ? x : d;
}

// The same subgradient for a kind known only at run time (one switch per call), for code that
// evaluates it once per channel, where instantiating a whole kernel per penalty is not worth it
// (the BatchNorm backward adds it to grad_weight).
template <typename T>
C10_HOST_DEVICE inline T penalty_subgradient_dynamic(T x, const PenaltyParams& pp) {
  switch (pp.kind) {
    case PenaltyKind::L1: return penalty_subgradient<PenaltyKind::L1>(x, pp);
    case PenaltyKind::L2: return penalty_subgradient<PenaltyKind::L2>(x, pp);
    case PenaltyKind::Lp: return penalty_subgradient<PenaltyKind::Lp>(x, pp);
    case PenaltyKind::TL1: return penalty_subgradient<PenaltyKind::TL1>(x, pp);
    case PenaltyKind::SCAD: return penalty_subgradient<PenaltyKind::SCAD>(x, pp);
    case PenaltyKind::MCP: return penalty_subgradient<PenaltyKind::MCP>(x, pp);
  }
  return x;  // unreachable: parse_penalty only produces the kinds above
}

// ---------------------------------------------------------------------------------------------
// Proximal operators on u = |v| >= 0: argmin_{x >= 0} 1/2 (x - u)^2 + mu * g(x).

namespace detail {

// Lp, p = 1/2: Xu et al. 2012 half-thresholding in the 1/2-convention (penalties.md §2).
template <typename T>
C10_HOST_DEVICE inline T prox_lp_half_abs(T u, T mu) {
  using std::acos;
  using std::cos;
  using std::pow;
  const T thr = T(1.5) * pow(mu, T(2) / T(3));
  if (u <= thr) return T(0);
  const T arg = clamp_to((mu / T(4)) * pow(T(3) / u, T(1.5)), T(-1), T(1));
  const T two_pi_over_3 = T(2.0943951023931954923);
  return (T(2) / T(3)) * u * (T(1) + cos(two_pi_over_3 - (T(2) / T(3)) * acos(arg)));
}

// Lp, p = 2/3: Cao, Sun & Xu 2013, with their lambda' = 2 mu (penalties.md §2).
template <typename T>
C10_HOST_DEVICE inline T prox_lp_two_thirds_abs(T u, T mu) {
  using std::acosh;
  using std::cosh;
  using std::pow;
  using std::sqrt;
  const T thr = T(2) * pow(T(2) * mu / T(3), T(0.75));
  if (u <= thr) return T(0);
  const T lam2 = T(2) * mu;
  const T theta = acosh(max_of((T(27) * u * u / T(16)) * pow(lam2, T(-1.5)), T(1)));
  const T phi = (T(2) / sqrt(T(3))) * pow(lam2, T(0.25)) * sqrt(cosh(theta / T(3)));
  const T root = sqrt(max_of(T(2) * u / phi - phi * phi, T(0)));
  const T half = (phi + root) / T(2);
  return half * half * half;
}

// Lp, general p: generalized soft-thresholding (Zuo et al., ICCV 2013), fixed-point iteration
// from x0 = u until it stops moving (linear convergence; 200 steps bound the worst case p -> 1).
template <typename T>
C10_HOST_DEVICE inline T prox_lp_general_abs(T u, T mu, T p) {
  using std::pow;
  const T base = T(2) * mu * (T(1) - p);
  const T tau = pow(base, T(1) / (T(2) - p)) + mu * p * pow(base, (p - T(1)) / (T(2) - p));
  if (u <= tau) return T(0);
  T x = u;
  for (int it = 0; it < 200; ++it) {
    const T next = u - mu * p * pow(x, p - T(1));
    const T step = std::abs(next - x);
    x = next;
    if (step <= T(4) * machine_epsilon<T>() * x) break;
  }
  return x;
}

// TL1 (Zhang & Xin 2017). Evaluated in double: it is a small difference of O(a) terms and fp32
// loses 3-7% of a typical per-step shrink (penalties.md §3).
C10_HOST_DEVICE inline double prox_tl1_abs(double u, double mu, double a) {
  const double thr = (mu <= a * a / (2.0 * (a + 1.0))) ? mu * (a + 1.0) / a
                                                        : std::sqrt(2.0 * mu * (a + 1.0)) - a / 2.0;
  if (u <= thr) return 0.0;
  const double d = a + u;
  const double arg = clamp_to(1.0 - 27.0 * mu * a * (a + 1.0) / (2.0 * d * d * d), -1.0, 1.0);
  const double phi = std::acos(arg);
  return (2.0 / 3.0) * d * std::cos(phi / 3.0) - 2.0 * a / 3.0 + u / 3.0;
}

// SCAD prox of c * p_{lam,a} (penalties.md §4).
template <typename T>
C10_HOST_DEVICE inline T prox_scad_abs(T u, T c, T a, T lam) {
  if (a > T(1) + c) {
    if (u <= (T(1) + c) * lam) return max_of(u - c * lam, T(0));
    if (u <= a * lam) return ((a - T(1)) * u - c * a * lam) / (a - T(1) - c);
    return u;
  }
  // Nonconvex prox: compare the two candidate minimisers; ties go to the smaller one.
  const T x1 = clamp_to(u - c * lam, T(0), lam);
  const T x3 = max_of(u, a * lam);
  const T f1 = T(0.5) * (x1 - u) * (x1 - u) + c * scad_value_abs(x1, a, lam);
  const T f3 = T(0.5) * (x3 - u) * (x3 - u) + c * scad_value_abs(x3, a, lam);
  return f3 < f1 ? x3 : x1;
}

// MCP prox of c * p_{lam,gamma} (penalties.md §5): firm thresholding, or hard when gamma <= c.
template <typename T>
C10_HOST_DEVICE inline T prox_mcp_abs(T u, T c, T gamma, T lam) {
  if (gamma > c) {
    if (u <= gamma * lam) return gamma * max_of(u - c * lam, T(0)) / (gamma - c);
    return u;
  }
  return u > lam * std::sqrt(c * gamma) ? u : T(0);
}

}  // namespace detail

// prox_{mu g}(v) = argmin_x 1/2 (x - v)^2 + mu * g(x) for mu > 0; non-finite v is returned as is.
// mu = 0 (the identity) is the caller's job: kernels skip such tensors, as some thresholds
// below are undefined at mu = 0.
template <PenaltyKind K, typename T>
C10_HOST_DEVICE inline T penalty_prox(T v, T mu, const PenaltyParams& pp) {
  const T u = std::abs(v);
  T x;
  if constexpr (K == PenaltyKind::L1) {
    x = detail::max_of(u - mu, T(0));
  } else if constexpr (K == PenaltyKind::L2) {
    x = u / (T(1) + T(2) * mu);
  } else if constexpr (K == PenaltyKind::Lp) {
    if (pp.p == 0.5) {
      x = detail::prox_lp_half_abs(u, mu);
    } else if (std::abs(pp.p - 2.0 / 3.0) < 1e-12) {
      x = detail::prox_lp_two_thirds_abs(u, mu);
    } else {
      x = detail::prox_lp_general_abs(u, mu, static_cast<T>(pp.p));
    }
  } else if constexpr (K == PenaltyKind::TL1) {
    x = static_cast<T>(detail::prox_tl1_abs(static_cast<double>(u), static_cast<double>(mu), pp.a));
  } else if constexpr (K == PenaltyKind::SCAD) {
    x = detail::prox_scad_abs(u, mu, static_cast<T>(pp.a), static_cast<T>(pp.knee));
  } else {
    static_assert(K == PenaltyKind::MCP, "unhandled penalty");
    x = detail::prox_mcp_abs(u, mu, static_cast<T>(pp.a), static_cast<T>(pp.knee));
  }
  const T signed_x = v < T(0) ? -x : x;
  return detail::is_finite(v) ? signed_x : v;
}

// Calls f(std::integral_constant<PenaltyKind, K>{}) for the runtime kind, so kernels are
// instantiated once per penalty and their inner loops carry no switch.
template <typename F>
inline void dispatch_penalty_kind(PenaltyKind kind, F&& f) {
  switch (kind) {
    case PenaltyKind::L1: return f(std::integral_constant<PenaltyKind, PenaltyKind::L1>{});
    case PenaltyKind::L2: return f(std::integral_constant<PenaltyKind, PenaltyKind::L2>{});
    case PenaltyKind::Lp: return f(std::integral_constant<PenaltyKind, PenaltyKind::Lp>{});
    case PenaltyKind::TL1: return f(std::integral_constant<PenaltyKind, PenaltyKind::TL1>{});
    case PenaltyKind::SCAD: return f(std::integral_constant<PenaltyKind, PenaltyKind::SCAD>{});
    case PenaltyKind::MCP: return f(std::integral_constant<PenaltyKind, PenaltyKind::MCP>{});
  }
}

}  // namespace slimcore
