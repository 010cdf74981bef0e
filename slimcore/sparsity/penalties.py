"""Sparsity penalties g on BatchNorm scaling factors: validated parameters -> op arguments.

The training objective is ``loss + lam * sum_i g(gamma_i)``. Each penalty turns ``lam`` into a
:class:`PenaltyTerm` ``strength * g_op(x)``, where ``g_op`` is one of the kernel penalties
(csrc/penalties.h, slimcore/reference.py). Formulas and sources: docs/penalties.md.

    L1()                 g = |x|                                  (network slimming)
    L2()                 g = x^2                                  (ridge; never gives exact zeros)
    Lp(p, eps=1e-4)      g = |x|^p, 0 < p < 1                     (separable quasi-norm)
    LpNorm(p, eps=1e-4)  lam * (sum |x|^p)^(1/p)                  (one norm of all gammas; subgradient only)
    TL1(a=1.0)           g = (a+1)|x| / (a+|x|)                   (transformed L1)
    SCAD(a=3.7)          Fan & Li; lam is SCAD's own lambda (slope at 0, knees lam and a*lam)
    MCP(gamma=3.0)       Zhang; lam is MCP's own lambda (slope at 0, flat beyond gamma*lam)

SCAD and MCP take ``theta`` for the strength/shape form ``lam * p_theta(x) / theta``: slope ``lam``
at 0 like L1, flat beyond ``a*theta`` (``gamma*theta``), so ``lam`` is comparable across penalties.
For Lp, ``eps`` bounds the subgradient near 0 (``p*sign(x)*(|x|+eps)^(p-1)``, the derivative of
``(|x|+eps)^p - eps^p``); the proximal step always uses the exact ``|x|^p``.
"""

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional


class PenaltyTerm(NamedTuple):
    """``strength * g_op(x)``: the arguments of the penalty ops."""

    op: str
    strength: float
    p: float = 0.0
    a: float = 0.0
    knee: float = 0.0
    eps: float = 0.0


def _check(ok, message):
    if not ok:
        raise ValueError(message)


def _finite(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


class Penalty:
    """Base class. ``term(lam)`` gives the kernel arguments of ``lam * g``."""

    supports_prox = True

    def term(self, lam: float) -> PenaltyTerm:
        raise NotImplementedError


@dataclass(frozen=True)
class L1(Penalty):

    def term(self, lam):
        return PenaltyTerm("l1", lam)


@dataclass(frozen=True)
class L2(Penalty):

    def term(self, lam):
        return PenaltyTerm("l2", lam)


@dataclass(frozen=True)
class Lp(Penalty):
    p: float
    eps: float = 1e-4

    def __post_init__(self):
        _check(_finite(self.p) and 0 < self.p < 1, f"Lp needs 0 < p < 1 (use L1() for p = 1), got p={self.p!r}")
        _check(_finite(self.eps) and self.eps >= 0, f"Lp needs a finite eps >= 0, got eps={self.eps!r}")

    def term(self, lam):
        return PenaltyTerm("lp", lam, p=float(self.p), eps=float(self.eps))


@dataclass(frozen=True)
class LpNorm(Penalty):
    """``lam * (sum_i |x_i|^p)^(1/p)``: one Lp norm over all BN weights at once (not separable)."""

    p: float
    eps: float = 1e-4
    supports_prox = False

    def __post_init__(self):
        _check(_finite(self.p) and 0 < self.p < 1, f"LpNorm needs 0 < p < 1 (use L1() for p = 1), got p={self.p!r}")
        _check(_finite(self.eps) and self.eps >= 0, f"LpNorm needs a finite eps >= 0, got eps={self.eps!r}")

    def term(self, lam):
        # The per-element part; the data-dependent factor ||x||_p^(1-p)/p is applied by the caller.
        return PenaltyTerm("lp", lam, p=float(self.p), eps=float(self.eps))


@dataclass(frozen=True)
class TL1(Penalty):
    a: float = 1.0

    def __post_init__(self):
        _check(_finite(self.a) and self.a > 0, f"TL1 needs a finite a > 0, got a={self.a!r}")

    def term(self, lam):
        return PenaltyTerm("tl1", lam, a=float(self.a))


def _check_theta(cls, theta):
    _check(theta is None or (_finite(theta) and theta > 0), f"{cls} needs theta > 0 (or None), got theta={theta!r}")


@dataclass(frozen=True)
class SCAD(Penalty):
    a: float = 3.7
    theta: Optional[float] = None

    def __post_init__(self):
        _check(_finite(self.a) and self.a > 2, f"SCAD needs a > 2, got a={self.a!r}")
        _check_theta("SCAD", self.theta)

    def term(self, lam):
        if self.theta is None:  # native: lam is SCAD's lambda
            return PenaltyTerm("scad", 1.0, a=float(self.a), knee=lam)
        return PenaltyTerm("scad", lam / self.theta, a=float(self.a), knee=float(self.theta))


@dataclass(frozen=True)
class MCP(Penalty):
    gamma: float = 3.0
    theta: Optional[float] = None

    def __post_init__(self):
        _check(_finite(self.gamma) and self.gamma > 1, f"MCP needs gamma > 1, got gamma={self.gamma!r}")
        _check_theta("MCP", self.theta)

    def term(self, lam):
        if self.theta is None:  # native: lam is MCP's lambda
            return PenaltyTerm("mcp", 1.0, a=float(self.gamma), knee=lam)
        return PenaltyTerm("mcp", lam / self.theta, a=float(self.gamma), knee=float(self.theta))


_BY_NAME = {"l1": L1, "l2": L2, "lp": Lp, "lpnorm": LpNorm, "tl1": TL1, "scad": SCAD, "mcp": MCP}
NAMES = tuple(_BY_NAME)


def get(penalty="l1", **params) -> Penalty:
    """A Penalty from an instance (returned as is) or a name plus its parameters, e.g.
    ``get("lp", p=0.5)``, ``get("tl1", a=0.5)``, ``get("scad")``."""
    if isinstance(penalty, Penalty):
        if params:
            raise ValueError(f"penalty parameters {sorted(params)} given with a {type(penalty).__name__} instance")
        return penalty
    if not isinstance(penalty, str) or penalty.lower() not in _BY_NAME:
        raise ValueError(f"unknown penalty {penalty!r}; expected a slimcore.penalties object or one of {', '.join(NAMES)}")
    cls = _BY_NAME[penalty.lower()]
    try:
        return cls(**params)
    except TypeError as exc:
        raise ValueError(f"bad parameters for penalty {penalty!r}: {exc}") from None
