"""Figures and markdown summaries of run directories (``slimcore report``).

For one run: the gamma distribution after sparsity training (histogram, and the paper's sorted
|gamma| curve with each prune threshold), accuracy per epoch of every stage, accuracy vs prune
ratio (straight after pruning and after fine-tuning, against the unpruned baseline), and params,
FLOPs and size on disk vs prune ratio. For a sweep of runs (e.g. three lambdas): their gamma
distributions side by side and a comparison table.
"""

import glob
import json
import os
import statistics

import torch

from ..sparsity.step import bn_weights


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("slimcore report needs matplotlib: pip install matplotlib") from None
    return plt


def _save(plt, fig, out_dir, name):
    """Writes fig as out_dir/name (PNG), closes it, returns name."""
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, name), dpi=110)
    plt.close(fig)
    return name


def _save_line_plot(plt, fig, ax, out_dir, name, xlabel, ylabel, title):
    """Labels a line plot (grid, small legend) and writes it as out_dir/name; returns name."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(plt, fig, out_dir, name)


def _json(path):
    with open(path) as f:
        return json.load(f)


def _metrics(stage_dir):
    path = os.path.join(stage_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _gammas(model_path):
    from .train import load_model

    model, _ = load_model(model_path)
    weights = [w.detach().abs().flatten() for _, w in bn_weights(model)]
    return torch.cat(weights).sort().values if weights else torch.zeros(0)


def _stages(run):
    """[(prefix, stage dir)] of the run's passes: ("", run) or ("pass1/", run/pass1), ..."""
    passes = sorted(glob.glob(os.path.join(run, "pass*")), key=lambda p: int(p.rsplit("pass", 1)[1] or 0))
    return [(os.path.basename(p) + "/", p) for p in passes] or [("", run)]


def _ratio_rows(base):
    rows = []
    for path in sorted(glob.glob(os.path.join(base, "prune-*", "report.json"))):
        rep = _json(path)
        ratio_name = os.path.basename(os.path.dirname(path))[len("prune-"):]
        tuned = _metrics(os.path.join(base, f"finetune-{ratio_name}"))
        rep["finetuned_acc"] = tuned[-1]["test_acc"] if tuned else None
        rep["stage"] = f"prune-{ratio_name}"
        rows.append(rep)
    return sorted(rows, key=lambda r: r["ratio"])


def report_run(run, out_dir):
    plt = _plt()
    os.makedirs(out_dir, exist_ok=True)
    config = _json(os.path.join(run, "config.json"))
    lines = [f"# slimcore run: {config['model']} on {config['dataset']}", "",
             f"Settings: `{json.dumps({k: config['train'].get(k) for k in ('penalty', 'lam', 'mode', 'bn', 'epochs', 'batch_size', 'lr', 'width', 'seed')})}`", ""]
    figures = []
    for prefix, base in _stages(run):
        tag = prefix.rstrip("/") or "run"
        title = f" ({tag})" if prefix else ""
        train_model = os.path.join(base, "train", "model.pt")
        rows = _ratio_rows(base)
        if os.path.exists(train_model):
            g = _gammas(train_model).numpy()
            fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
            ax1.hist(g, bins=60, color="C0")
            ax1.set_yscale("log")
            ax1.set_xlabel("|gamma|")
            ax1.set_ylabel("channels")
            ax1.set_title(f"gamma after sparsity training{title}")
            ax2.plot(range(len(g)), g, color="C0")
            for r in rows:
                if r.get("threshold") is not None and r["threshold"] != float("inf"):
                    ax2.axhline(r["threshold"], ls="--", lw=0.8, color="C3")
                    ax2.text(0, r["threshold"], f" {r['ratio']:g}", color="C3", fontsize=7, va="bottom")
            ax2.set_xlabel("channel (sorted)")
            ax2.set_ylabel("|gamma|")
            ax2.set_title("sorted |gamma| with prune thresholds")
            figures.append(_save(plt, fig, out_dir, f"{tag}_gamma.png"))
        stage_dirs = [os.path.join(base, "train")] + sorted(glob.glob(os.path.join(base, "finetune-*")))
        fig, ax = plt.subplots(figsize=(7, 4))
        for i, d in enumerate(stage_dirs):
            m = _metrics(d)
            if not m:
                continue
            label = os.path.basename(d)
            ax.plot([r["epoch"] + 1 for r in m], [r["train_acc"] for r in m], color=f"C{i}", alpha=0.5,
                    label=f"{label} train")
            ax.plot([r["epoch"] + 1 for r in m], [r["test_acc"] for r in m], color=f"C{i}", label=f"{label} test")
            if m[0].get("val_acc") is not None:
                ax.plot([r["epoch"] + 1 for r in m], [r["val_acc"] for r in m], ":", color=f"C{i}",
                        label=f"{label} val")
        figures.append(_save_line_plot(plt, fig, ax, out_dir, f"{tag}_accuracy.png", "epoch", "accuracy",
                                       f"accuracy per epoch{title}"))
        if rows:
            ratios = [r["ratio"] for r in rows]
            fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
            ax1.plot(ratios, [r["acc_after"] for r in rows], "o-", label="pruned")
            if any(r["finetuned_acc"] is not None for r in rows):
                ax1.plot([r["ratio"] for r in rows if r["finetuned_acc"] is not None],
                         [r["finetuned_acc"] for r in rows if r["finetuned_acc"] is not None], "s-", label="fine-tuned")
            ax1.axhline(rows[0]["acc_before"], ls="--", color="gray", label="unpruned")
            ax1.set_xlabel("prune ratio")
            ax1.set_ylabel("test accuracy")
            ax1.legend()
            ax1.grid(alpha=0.3)
            for key, label in (("params", "params"), ("flops", "FLOPs"), ("size", "size on disk")):
                ax2.plot(ratios, [r[f"{key}_after"] / r[f"{key}_before"] for r in rows], "o-", label=label)
            ax2.set_xlabel("prune ratio")
            ax2.set_ylabel("fraction of the unpruned model")
            ax2.legend()
            ax2.grid(alpha=0.3)
            figures.append(_save(plt, fig, out_dir, f"{tag}_ratios.png"))
            lines += [f"## Pruning{title}", "",
                      "| stage | criterion | ratio | channels removed | acc unpruned | acc pruned | acc fine-tuned | params | FLOPs | size MB |",
                      "|---|---|---|---|---|---|---|---|---|---|"]
            for r in rows:
                tuned = f"{r['finetuned_acc']:.4f}" if r["finetuned_acc"] is not None else "-"
                share = r.get("channels_removed_share")  # absent from reports written before it existed
                share = f"{100 * share:.1f}%" if share is not None else "-"
                lines.append(f"| {r['stage']} | {r['criterion']} | {r['ratio']:.4g} | {share} | {r['acc_before']:.4f} | {r['acc_after']:.4f} | {tuned} | "
                             f"{r['params_before']:,} → {r['params_after']:,} | "
                             f"{r['flops_before'] / 1e6:.1f}M → {r['flops_after'] / 1e6:.1f}M | "
                             f"{r['size_before'] / 1e6:.2f} → {r['size_after'] / 1e6:.2f} |")
            lines.append("")
    lines += ["## Figures", ""] + [f"![{f}]({f})" for f in figures]
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def penalty_label(train):
    """'lp p=0.5', 'tl1 a=1', 'scad theta=0.5', ... from a run config's train settings."""
    name, lam = train.get("penalty", "l1"), train.get("lam", 0.0)
    if not lam:
        return "none"
    if name in ("lp", "lpnorm"):
        return f"{name} p={train.get('p'):g}"
    if name == "tl1":
        a = train.get("a")
        return f"tl1 a={1.0 if a is None else a:g}"  # None: TL1's default
    if name in ("scad", "mcp"):
        theta = train.get("theta")
        return name + (f" theta={theta:g}" if theta is not None else "")
    return name


_NOT_SETTINGS = ("seed", "out", "quiet", "resume", "device", "command", "channels_last")  # channels_last: a layout


def _seed_group(config):
    """What a run is apart from its seed: runs that differ only in --seed share it. An option left
    unset (None) counts as absent, so runs from before an option existed group with newer ones."""
    train = {k: v for k, v in config["train"].items() if k not in _NOT_SETTINGS and v is not None}
    return json.dumps({k: config.get(k) for k in ("model", "model_kwargs", "dataset", "augment")} | {"train": train},
                      sort_keys=True)


def _mean_std(values, scale=1.0, digits=2):
    values = [v * scale for v in values if v is not None]
    if not values:
        return "-"
    mean = statistics.mean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"  # sample std


def _seed_table(summaries):
    """Mean ± sample std over runs that differ only by seed, per prune stage all of them have."""
    groups = {}
    for item in summaries:
        groups.setdefault(item["group"], []).append(item)
    if all(len(g) == 1 for g in groups.values()):
        return []
    # a stage column where every run of some group has that stage ("-" for the other groups)
    stages = set().union(*(set.intersection(*(set(i["stages"]) for i in g)) for g in groups.values()))
    stages = sorted(stages, key=lambda n: (len(n), n))
    head = "| runs | penalty | mode | lambda | seeds | test acc % | exact zeros % |"
    rule = "|---|---|---|---|---|---|---|"
    for n in stages:
        head += f" {n}: pruned % | fine-tuned % | params removed % |"
        rule += "---|---|---|"
    lines = ["## Mean ± std over seeds", "", head, rule]
    for g in groups.values():
        first = g[0]
        row = (f"| {', '.join(i['name'] for i in g)} | {first['label']} | {first['mode']} | {first['lam']:g} | "
               f"{len(g)} | {_mean_std([i['acc'] for i in g], 100)} | {_mean_std([i['zeros'] for i in g], 100, 1)} |")
        for n in stages:
            if not all(n in i["stages"] for i in g):
                row += " - | - | - |"
                continue
            rs = [i["stages"][n] for i in g]
            row += (f" {_mean_std([r['acc_after'] for r in rs], 100)} | {_mean_std([r['finetuned_acc'] for r in rs], 100)}"
                    f" | {_mean_std([1 - r['params_after'] / r['params_before'] for r in rs], 100, 1)} |")
        lines.append(row)
    return lines + [""]


def report_sweep(runs, out_dir):
    """Compares runs: a table of their sparsity training (penalty, mode, lambda, accuracy, gamma
    sparsity), a table of every prune stage of each run (criterion, ratio, FLOPs, params, accuracy
    pruned and fine-tuned), mean ± std over runs that differ only by seed, their gamma
    distributions, and accuracy against FLOPs kept per (run, criterion): the Pareto plot
    filter-pruning papers draw."""
    plt = _plt()
    os.makedirs(out_dir, exist_ok=True)
    cols = min(4, len(runs))
    nrows = -(-len(runs) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    lines = ["# slimcore sweep", "",
             "| run | penalty | mode | lambda | test acc | \\|gamma\\| < 1e-2 | exact zeros |",
             "|---|---|---|---|---|---|---|"]
    prune_lines = ["| run | stage | criterion | scope | ratio | FLOPs kept | params | params removed | "
                   "acc pruned | acc fine-tuned |", "|---|---|---|---|---|---|---|---|---|---|"]
    series, summaries = {}, []
    for i, run in enumerate(runs):
        ax = axes[i // cols][i % cols]
        config = _json(os.path.join(run, "config.json"))
        name = os.path.basename(os.path.normpath(run))
        train = config["train"]
        base = _stages(run)[0][1]
        g = _gammas(os.path.join(base, "train", "model.pt")).numpy()
        ax.hist(g, bins=50, color="C0")
        lam = train.get("lam")
        label = penalty_label(train)
        ax.set_title(f"{name}: {label} lambda={lam:g}", fontsize=9)
        ax.set_xlabel("|gamma|")
        ax.set_yscale("log")
        m = _metrics(os.path.join(base, "train"))
        acc = m[-1]["test_acc"] if m else float("nan")
        lines.append(f"| {name} | {label} | {train.get('mode', 'subgradient')} | {lam:g} | {acc:.4f} | "
                     f"{(g < 1e-2).mean():.3f} | {(g == 0).mean():.3f} |")
        rows = _ratio_rows(base)
        summaries.append({"name": name, "group": _seed_group(config), "label": label, "lam": lam,
                          "mode": train.get("mode", "subgradient"), "acc": acc, "zeros": float((g == 0).mean()),
                          "stages": {r["stage"]: r for r in rows}, "train_metrics": m})
        for r in sorted(rows, key=lambda r: (r["criterion"], r["flops_after"])):
            pruned_from = os.path.basename(os.path.dirname(r["source"])) if "source" in r else ""
            kept = r["flops_after"] / max(r["flops_before"], 1)
            tuned = f"{r['finetuned_acc']:.4f}" if r["finetuned_acc"] is not None else "-"
            prune_lines.append(
                f"| {name} | {r['stage']} | {r['criterion']} | {r.get('scope', 'global')} | {r['ratio']:.4g} | "
                f"{kept:.3f} | {r['params_after']:,} | {100 * (1 - r['params_after'] / r['params_before']):.1f}% | "
                f"{r['acc_after']:.4f} | {tuned} |")
            if r["finetuned_acc"] is not None and pruned_from == "train":  # not prunes of prunes
                # one line per way of pruning: criterion, scope, layer cap
                how = r["criterion"] + (f", {r['scope']}" if r.get("scope", "global") != "global" else "")
                if r.get("max_layer_ratio", 1.0) < 1.0:
                    how += f", max_layer_ratio {r['max_layer_ratio']:g}"
                series.setdefault((name, how), []).append((kept, r["finetuned_acc"]))
    for j in range(len(runs), nrows * cols):
        axes[j // cols][j % cols].axis("off")
    for row in axes:
        row[0].set_ylabel("channels")
    fig.suptitle("gamma distribution after sparsity training")
    _save(plt, fig, out_dir, "sweep_gamma.png")
    lines += ["", "![gamma distributions](sweep_gamma.png)"]
    if len(prune_lines) > 2:
        lines += ["", "## Prune stages", ""] + prune_lines
    seeds = _seed_table(summaries)
    if seeds:
        lines += [""] + seeds
    fig, ax = plt.subplots(figsize=(7, 4))
    for k, item in enumerate(summaries):  # sparsity training, accuracy per epoch of each run
        m = item["train_metrics"]
        ax.plot([r["epoch"] + 1 for r in m], [r["test_acc"] for r in m], color=f"C{k % 10}",
                label=f"{item['name']}: {item['label']} lambda={item['lam']:g}")
    _save_line_plot(plt, fig, ax, out_dir, "sweep_accuracy.png", "epoch", "test accuracy",
                    "sparsity training: test accuracy per epoch")
    lines += ["", "![accuracy per epoch](sweep_accuracy.png)"]
    if series:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        accs = [a for points in series.values() for _, a in points] + [i["acc"] for i in summaries]
        # the y-axis spans 10 points below the best; collapsed models sit on its floor as triangles
        floor = max(min(accs), max(accs) - 0.10)
        for k, ((name, how), points) in enumerate(sorted(series.items())):
            points.sort()
            ax.plot([p[0] for p in points], [max(p[1], floor) for p in points], "o-", color=f"C{k % 10}",
                    label=f"{name}: {how}")
            low = [p for p in points if p[1] < floor]
            ax.plot([p[0] for p in low], [floor] * len(low), "v", ms=9, color=f"C{k % 10}")
            for p in low:
                ax.annotate(f"{p[1]:.3f}", (p[0], floor), fontsize=6, xytext=(4, 4), textcoords="offset points")
        ax.set_ylim(floor - 0.005, max(accs) + 0.005)
        for k, item in enumerate(summaries):  # each run's unpruned model, at all of its FLOPs
            if any(key[0] == item["name"] for key in series):
                ax.plot([1.0], [item["acc"]], "*", ms=10, color="k", alpha=0.3 + 0.7 * k / max(len(summaries) - 1, 1))
                ax.annotate(f"{item['name']} unpruned", (1.0, item["acc"]), fontsize=6, ha="right",
                            xytext=(-6, 0), textcoords="offset points")
        _save_line_plot(plt, fig, ax, out_dir, "sweep_pareto.png", "FLOPs kept (fraction of the unpruned model)",
                        "test accuracy after fine-tuning", "accuracy vs FLOPs")
        lines += ["", "![accuracy vs FLOPs](sweep_pareto.png)"]
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path
