"""``PruneOptions``: every choice of a prune but the model, its inputs, the optimizer and dry_run,
validated once. ``slimcore.prune`` builds one from its keyword arguments; the ratio searches and
the whole-model latency check copy it with ``dataclasses.replace`` instead of re-listing them.
"""

import dataclasses
import numbers
from typing import Any, Callable

import numpy as np
from torch import nn

from .criteria import CRITERIA

SCOPES = ("global", "layer")


def is_real(value):
    """A real number, numpy's included (np.float32(0.5) from a sweep), but not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def is_integer(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def leaf_module_types(leaf_modules):
    if isinstance(leaf_modules, str):
        raise TypeError(f"slimcore.prune: leaf_modules must be submodules or module classes, not a string "
                        f"({leaf_modules!r}); pass the module object or its class")
    if isinstance(leaf_modules, nn.Module) or isinstance(leaf_modules, type):
        return (leaf_modules,)
    return tuple(leaf_modules)


@dataclasses.dataclass(frozen=True)
class PruneOptions:
    """The options of :func:`slimcore.prune` (its docstring says what each does), checked and
    normalised: ``ratio`` and ``max_layer_ratio`` floats, ``round_to`` an int or "auto",
    ``leaf_modules`` a tuple."""

    ratio: float = 0.5
    criterion: str = "bn_scale"
    scope: str = "global"
    round_to: Any = 1
    min_channels: int = 1
    ignore: Any = ()
    compensate: bool = True
    max_layer_ratio: float = 1.0
    collapse_blocks: bool = True
    history: Any = None
    seed: int = 0
    leaf_modules: Any = ()
    device: Any = None
    latency_table: Any = None
    check_latency: bool = True
    deploy: Callable | None = None
    check_compensation: bool = False
    keep_outputs: Any = True
    select: Callable | None = None  # slimcore.prune_for_latency's hook (decide's ``select``)

    def __post_init__(self):
        if not (is_real(self.ratio) and 0.0 <= self.ratio < 1.0):
            raise ValueError(f"slimcore.prune: ratio must be a number in [0, 1), got {self.ratio!r}")
        if self.criterion not in CRITERIA:
            raise ValueError(f"slimcore.prune: unknown criterion {self.criterion!r}; expected one of "
                             f"{', '.join(CRITERIA)}")
        if self.scope not in SCOPES:
            raise ValueError(f"slimcore.prune: scope must be one of {SCOPES}, got {self.scope!r}")
        round_to = self.round_to
        if not (isinstance(round_to, str) and round_to == "auto" or is_integer(round_to) and round_to >= 1):
            raise ValueError(f"slimcore.prune: round_to must be an integer >= 1 or 'auto', got {round_to!r}")
        if not (is_integer(self.min_channels) and self.min_channels >= 1):
            raise ValueError(f"slimcore.prune: min_channels must be an integer >= 1, got {self.min_channels!r}")
        if not (is_real(self.max_layer_ratio) and 0.0 < self.max_layer_ratio <= 1.0):
            raise ValueError(f"slimcore.prune: max_layer_ratio must be in (0, 1], got {self.max_layer_ratio!r}")
        if self.select is not None and (round_to == "auto" or not callable(self.select)):
            raise ValueError("slimcore.prune: select must be a function, and does not combine with round_to='auto'")
        normalised = dict(ratio=float(self.ratio), max_layer_ratio=float(self.max_layer_ratio),
                          round_to=round_to if round_to == "auto" else int(round_to),
                          min_channels=int(self.min_channels), leaf_modules=leaf_module_types(self.leaf_modules))
        for name, value in normalised.items():
            object.__setattr__(self, name, value)

    @classmethod
    def from_kwargs(cls, fn, **kwargs):
        """PruneOptions(**kwargs), with an error naming ``fn`` for a keyword prune does not take."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"slimcore.{fn}: unexpected prune option(s) {', '.join(map(repr, unknown))}; "
                            f"expected some of {', '.join(sorted(names))}")
        return cls(**kwargs)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)
