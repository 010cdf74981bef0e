"""What a prune did: ``PruneReport``.
"""

from dataclasses import dataclass, field




@dataclass
class PruneReport:
    """What a prune did (or, with ``dry_run=True``, would do).

    ``flops_*`` are multiply-accumulates per sample of conv and linear layers (slimcore.profile's
    convention); ``channels`` maps every conv, linear and BN to its (before, after) output channel
    count (after = 0: the module went with a collapsed residual block); ``removed`` maps every
    module whose output channels shrank to the removed indices, in that module's original
    numbering.
    """

    ratio: float
    criterion: str
    scope: str
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    channels: dict
    removed: dict
    threshold: float = None
    notes: list = field(default_factory=list)
    seconds: float = 0.0
    dry_run: bool = False
    compensated: dict = field(default_factory=dict)  # consumer -> number of dropped inputs folded into its bias
    # |pruned - dense with removed channels at their constants| on the example inputs (nonzero only at
    # padded conv borders); None when the constants came from the parameters (check_compensation=False)
    compensation_max_error: float = 0.0
    compensation_mean_error: float = 0.0
    collapsed: list = field(default_factory=list)  # residual blocks replaced by x + constant
    widths: list = field(default_factory=list)  # round_to="auto": per layer asked/chosen width and timings (ms)
    latency_check: dict = None  # round_to="auto": whole-model ms per candidate ("auto", "1", "8", ...) and the chosen one
    # Share of the scored channels (the pool a global ``ratio`` is a share of: every output channel
    # of a conv, linear or selection BN that has a score and is not frozen, channels tied together
    # going together) actually removed: min_channels, max_layer_ratio and round_to put channels
    # back, collapsed blocks and selection fixes take more.
    channels_removed_share: float = 0.0
    # Coverage: conv/linear name -> (output channels that could be removed, output channels, whether
    # a BN normalises them). The rest are frozen for the reasons in ``notes``.
    prunable: dict = field(default_factory=dict)
    # Conv/linear layers left with only min_channels: the criterion would have emptied them.
    starved: list = field(default_factory=list)
    # Which decision chose the channels: "threshold" (ratio's global or per-layer threshold) or
    # "latency" (slimcore.prune_for_latency's latency-aware selection, which also fills ``latency``:
    # the measured and estimated latency fractions of the result, and the importance it kept).
    selection: str = "threshold"
    latency: dict = None

    @property
    def prunable_share(self):
        """Share of the conv/linear output channels that are prunable (not frozen)."""
        total = sum(t for _, t, _ in self.prunable.values())
        return sum(p for p, _, _ in self.prunable.values()) / total if total else 0.0

    @property
    def channels_removed(self):
        return sum(len(v) for v in self.removed.values())

    def __str__(self):
        p = 100 * (1 - self.params_after / max(self.params_before, 1))
        f = 100 * (1 - self.flops_after / max(self.flops_before, 1))
        lines = [
            f"slimcore.prune{' (dry run)' if self.dry_run else ''}: criterion={self.criterion} scope={self.scope} "
            f"ratio={self.ratio} in {self.seconds:.3f} s",
            f"  params {self.params_before:,} -> {self.params_after:,} (-{p:.1f}%)",
            f"  FLOPs  {self.flops_before:,} -> {self.flops_after:,} (-{f:.1f}%)",
            f"  channels removed: {100 * self.channels_removed_share:.1f}% of the scored ones (ratio asked {self.ratio:g})",
            f"  prunable: {100 * self.prunable_share:.1f}% of the conv/linear output channels (frozen: see notes)",
        ]
        shrunk = [(n, b, a) for n, (b, a) in self.channels.items() if a != b]
        lines.append(f"  {len(shrunk)} of {len(self.channels)} layers narrowed")
        for n, b, a in shrunk[:40]:
            lines.append(f"    {n:<40} {b:>6} -> {a}")
        if len(shrunk) > 40:
            lines.append(f"    ... {len(shrunk) - 40} more")
        widened = [w for w in self.widths if w["chosen"] != w["asked"]]
        if self.widths:
            lines.append(f"  round_to=auto: {len(widened)} of {len(self.widths)} layers widened to a faster width")
            for w in widened[:20]:
                lines.append(f"    {w['layer'][:40]:<40} {w['asked']:>6} -> {w['chosen']}  (ms: {w['ms']})")
        if self.latency_check:
            c = self.latency_check
            times = ", ".join(f"{k if k == 'auto' else 'round_to=' + k} {v:.3f}" for k, v in c["ms"].items())
            chosen = "the per-layer widths" if c["chosen"] == "auto" else f"round_to={c['chosen']}'s widths"
            lines.append(f"  whole model (ms): {times}; using {chosen}")
        if self.selection == "latency":
            importance = (self.latency or {}).get("importance") or "sum"
            lines.append(f"  channels chosen by latency-aware selection (slimcore.prune_for_latency, importance "
                         f"{importance})")
        if self.latency:
            c = self.latency
            lines.append(f"  latency: {c['measured_fraction']:.3f} of the dense model's as measured "
                         f"({c['pruned_ms']:.3f} / {c['dense_ms']:.3f} ms; target {c['target']:g})")
        lines += [f"  note: {n}" for n in self.notes[:10]]
        return "\n".join(lines)
