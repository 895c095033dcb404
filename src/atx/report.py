"""``atx-report <dir>``: collect finished runs under a directory into one table and plots.

A finished run is a directory holding ``metrics.json`` and ``.hydra/overrides.yaml`` (what
``atx-train`` writes). Runs whose overrides differ only in ``seed`` form one row: mean ± std
and median over seeds of the last-epoch and the best-epoch test error (the paper reports the
median of 5 seeds of the last epoch), the test error at the epoch chosen on held-out training
images when the runs had ``data.val_split`` (``selected/test_error``), plus the attention
agreement per group when measured.
Rows composed from a paper preset (``experiment=t1_...`` etc. with a ``distill`` preset) show
the paper's number beside ours (:mod:`atx.paper`, verified numbers only). Writes ``report.md``,
``report.csv``, for each swept number among beta and p a plot of error against it, and the
per-epoch transfer loss of every layer group (``report_transfer_losses.png``).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from atx.errors import AtxError
from atx.paper import paper_error

IGNORED = ("seed=", "hydra.", "teacher.checkpoint=", "hparams_search=")  # not a row's identity
PLOTTED = ("distill.at.beta", "distill.at.p")


def find_runs(root: Path) -> list[dict[str, Any]]:
    """Every finished run below ``root``: its overrides, seed and metrics."""
    runs = []
    for metrics_file in sorted(root.rglob("metrics.json")):
        run_dir = metrics_file.parent
        overrides_file = run_dir / ".hydra" / "overrides.yaml"
        if not overrides_file.is_file():
            continue
        overrides = yaml.safe_load(overrides_file.read_text()) or []
        config = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text()) or {}
        hydra_file = run_dir / ".hydra" / "hydra.yaml"
        hydra_cfg = yaml.safe_load(hydra_file.read_text()) if hydra_file.is_file() else {}
        choices = ((hydra_cfg or {}).get("hydra") or {}).get("runtime", {}).get("choices", {})
        runs.append({
            "choices": choices,
            "dir": run_dir,
            "overrides": [o for o in overrides if not o.lstrip("+~").startswith(IGNORED)],
            "seed": config.get("seed"),
            "config": config,
            "metrics": json.loads(metrics_file.read_text()),
        })
    return runs


def mean_std_median(values: Sequence[float]) -> tuple[float, float, float]:
    """mean, sample std (0 for one value), median."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), std, statistics.median(values)


def _select(config: dict[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def common_overrides(runs: list[dict[str, Any]]) -> list[str]:
    """The overrides every run shares (shown once, not in every row's label)."""
    shared = set.intersection(*(set(r["overrides"]) for r in runs)) if runs else set()
    return [o for o in runs[0]["overrides"] if o in shared] if runs else []


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per configuration: runs grouped by the overrides that vary, the seed aside."""
    common = set(common_overrides(runs))
    groups: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        key = " ".join(o for o in run["overrides"] if o not in common)
        groups.setdefault(key, []).append(run)
    rows = []
    for key, members in groups.items():
        last = [r["metrics"]["val/error"] for r in members if "val/error" in r["metrics"]]
        best = [r["metrics"]["best/val_error"] for r in members
                if r["metrics"].get("best/val_error") is not None]
        if not last:
            continue
        row: dict[str, Any] = {"config": key or "(the common overrides)", "seeds": len(last)}
        row["last_mean"], row["last_std"], row["last_median"] = mean_std_median(last)
        if best:
            row["best_mean"], row["best_std"], row["best_median"] = mean_std_median(best)
        selected = [r["metrics"]["selected/test_error"] for r in members
                    if r["metrics"].get("selected/test_error") is not None]
        if selected:  # data.val_split: the epoch was chosen on held-out training images
            stats = mean_std_median(selected)
            row["selected_mean"], row["selected_std"], row["selected_median"] = stats
        agreement = sorted({k for r in members for k in r["metrics"] if "agreement/" in k})
        for k in agreement:
            values = [r["metrics"][k] for r in members if k in r["metrics"]]
            row[k.replace("val/", "")] = statistics.fmean(values)
        for dotted in PLOTTED:
            row[dotted] = _select(members[0]["config"], dotted)
        choices = members[0]["choices"]
        paper = paper_error(choices.get("experiment"), choices.get("distill"))
        if paper is not None:
            row["paper_table"], row["paper_error"] = paper
        row["dirs"] = [r["dir"] for r in members]
        rows.append(row)
    return sorted(rows, key=lambda r: r["config"])


def _cell(row: dict[str, Any], name: str) -> str:
    if f"{name}_mean" not in row:
        return "-"
    return f"{row[f'{name}_mean']:.2f} ± {row[f'{name}_std']:.2f} ({row[f'{name}_median']:.2f})"


def write_markdown(rows: list[dict[str, Any]], path: Path, common: list[str]) -> None:
    agreement = sorted({k for r in rows for k in r if k.startswith("agreement/")})
    selected = any("selected_mean" in r for r in rows)  # a column only when runs have it
    head = ["config", "seeds", "last-epoch error % mean ± std (median)",
            "best-epoch error % mean ± std (median)",
            *(["test error % at held-out-best epoch, mean ± std (median)"] if selected else []),
            "paper", *agreement]
    lines = [f"All runs: `{' '.join(common)}`" if common else "", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        paper = f"{r['paper_error']:.2f} ({r['paper_table']})" if "paper_error" in r else "-"
        cells = [f"`{r['config']}`", str(r["seeds"]), _cell(r, "last"), _cell(r, "best"),
                 *([_cell(r, "selected")] if selected else []), paper]
        cells += [f"{r[k]:.3f}" if k in r else "-" for k in agreement]
        lines.append("| " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r if k != "dirs"))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def write_plots(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """Median last-epoch error against each swept number (beta, p), a line per setting of
    the other overrides that vary."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for x_key in PLOTTED:
        values = {r[x_key] for r in rows if r[x_key] is not None}
        if len(values) < 2:
            continue
        lines: dict[str, list[tuple[float, float]]] = {}  # a line per value of the other keys
        for r in rows:
            if r[x_key] is not None:
                rest = [o for o in r["config"].split() if not o.startswith(f"{x_key}=")]
                lines.setdefault(" ".join(rest), []).append((r[x_key], r["last_median"]))
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        for label, pts in sorted(lines.items()):
            ax.plot(*zip(*sorted(pts), strict=True), marker="o", label=label or "(all)")
        ax.set_xlabel(x_key)
        ax.set_ylabel("test error % (median over seeds)")
        if x_key.endswith("beta"):
            ax.set_xscale("log")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"report_error_vs_{x_key.split('.')[-1]}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


TRANSFER_TERMS = ("at/", "fact/", "grad_at", "symmetry", "min_l2", "kd")


def epoch_columns(run_dir: Path) -> dict[str, dict[int, float]]:
    """Every logged column of a run's ``csv/metrics.csv`` by epoch (counted from 0):
    ``{column: {epoch: value}}``; empty without the file."""
    path = run_dir / "csv" / "metrics.csv"
    columns: dict[str, dict[int, float]] = {}
    if not path.is_file():
        return columns
    with path.open(newline="") as f:
        for line in csv.DictReader(f):
            for key, value in line.items():
                if key and key != "epoch" and value and line.get("epoch"):
                    columns.setdefault(key, {})[int(float(line["epoch"]))] = float(value)
    return columns


def loss_curves(run_dir: Path) -> dict[str, dict[int, float]]:
    """Per-epoch transfer losses of one run: ``{term: {epoch: v}}`` for every
    ``train/<term>_epoch`` column of a transfer term (per layer group for AT/F-ActT)."""
    curves = {}
    for key, values in epoch_columns(run_dir).items():
        term = key[len("train/") : -len("_epoch")]
        if key.startswith("train/") and key.endswith("_epoch") and term.startswith(TRANSFER_TERMS):
            curves[term] = values
    return curves


def write_loss_plot(rows: list[dict[str, Any]], out: Path) -> Path | None:
    """One panel per transfer term / layer group: its epoch mean against the epoch, one line per
    row (mean over the row's seeds)."""
    per_row = []
    for r in rows:
        runs = [loss_curves(d) for d in r["dirs"]]
        terms = sorted({t for c in runs for t in c})
        mean = {}
        for t in terms:
            epochs = sorted({e for c in runs for e in c.get(t, {})})
            mean[t] = [(e, statistics.fmean(c[t][e] for c in runs if e in c.get(t, {})))
                       for e in epochs]
        per_row.append((r["config"], mean))
    terms = sorted({t for _, m in per_row for t in m})
    if not terms:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    colours = plt.get_cmap("tab20" if len(per_row) > 10 else "tab10").colors
    legend_rows = (len(per_row) + 1) // 2
    height = 3.0 + 0.2 * legend_rows  # inches: the panels, then the legend below them
    fig, axes = plt.subplots(1, len(terms), figsize=(max(7.0, 3.4 * len(terms)), height),
                             squeeze=False)
    for ax, term in zip(axes[0], terms, strict=True):
        for i, (label, mean) in enumerate(per_row):  # one colour per row in every panel
            if mean.get(term):
                ax.plot(*zip(*mean[term], strict=True), marker=".", label=label or "(all)",
                        color=colours[i % len(colours)])
        ax.set_title(term, fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0][0].set_ylabel("transfer loss (epoch mean)")
    handles = {h.get_label(): h for ax in axes[0] for h in ax.get_lines()}
    fig.legend(handles.values(), handles.keys(), loc="lower center", fontsize=7,
               ncol=max(1, min(2, len(handles))), frameon=False)
    fig.tight_layout(rect=(0, (0.2 * legend_rows + 0.1) / height, 1, 1))
    path = out / "report_transfer_losses.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(root: Path, out: Path | None = None) -> list[dict[str, Any]]:
    """Collect the runs below ``root``, write report.md / report.csv / plots into ``out``."""
    if not root.is_dir():
        raise AtxError(f"'{root}' is not a directory: give a run or sweep directory")
    runs = find_runs(root)
    rows = summarise(runs)
    if not rows:
        raise AtxError(f"no finished runs under '{root}' (looked for metrics.json beside .hydra/)")
    out = out or root
    out.mkdir(parents=True, exist_ok=True)
    write_markdown(rows, out / "report.md", common_overrides(runs))
    write_csv(rows, out / "report.csv")
    write_plots(rows, out)
    write_loss_plot(rows, out)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Console script ``atx-report``."""
    parser = argparse.ArgumentParser(prog="atx-report", description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="a sweep (or any) directory of atx runs")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: root)")
    parser.add_argument("--sensitivity", action="store_true",
                        help="also error vs beta / p, F_sum vs F_max and a verdict table"
                             " (sensitivity.png, sensitivity.md; atx.sensitivity)")
    parser.add_argument("--metric", default=None,
                        help="the error of --sensitivity, a metrics.json key (default:"
                             " heldout/error when every run has it, else val/error)")
    args = parser.parse_args(argv)
    out = args.out or args.root
    try:
        rows = report(args.root, args.out)
        if args.sensitivity:
            from atx.sensitivity import write_sensitivity  # it reads runs with find_runs

            write_sensitivity(args.root, out, args.metric)
    except AtxError as e:
        print(f"atx-report: error: {e}", file=sys.stderr)
        return 2
    print(out.joinpath("report.md").read_text(), end="")
    print(f"{len(rows)} configurations written to {out / 'report.md'}")
    if args.sensitivity:
        print(out.joinpath("sensitivity.md").read_text(), end="")
        print(f"sensitivity: {out / 'sensitivity.md'}, {out / 'sensitivity.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
