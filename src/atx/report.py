"""``atx-report <dir>``: collect finished runs under a directory into one table and plots.

A finished run is a directory holding ``metrics.json`` and ``.hydra/overrides.yaml`` (what
``atx-train`` writes). Runs whose overrides differ only in ``seed`` form one row: mean ± std
and median over seeds of the last-epoch and the best-epoch test error (the paper reports the
median of 5 seeds of the last epoch), plus the attention agreement per group when measured.
Writes ``report.md``, ``report.csv`` and, for each swept number among beta and p, a plot of
error against it.
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

IGNORED = ("seed=", "hydra.", "teacher.checkpoint=")  # not part of a row's identity
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
        runs.append({
            "dir": run_dir,
            "overrides": [o for o in overrides if not o.lstrip("+~").startswith(IGNORED)],
            "seed": config.get("seed"),
            "config": config,
            "metrics": json.loads(metrics_file.read_text()),
        })  # fmt: skip
    return runs


def _stats(values: Sequence[float]) -> tuple[float, float, float]:
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
                if r["metrics"].get("best/val_error") is not None]  # fmt: skip
        if not last:
            continue
        row: dict[str, Any] = {"config": key or "(the common overrides)", "seeds": len(last)}
        row["last_mean"], row["last_std"], row["last_median"] = _stats(last)
        if best:
            row["best_mean"], row["best_std"], row["best_median"] = _stats(best)
        agreement = sorted({k for r in members for k in r["metrics"] if "agreement/" in k})
        for k in agreement:
            values = [r["metrics"][k] for r in members if k in r["metrics"]]
            row[k.replace("val/", "")] = statistics.fmean(values)
        for dotted in PLOTTED:
            row[dotted] = _select(members[0]["config"], dotted)
        rows.append(row)
    return sorted(rows, key=lambda r: r["config"])


def _cell(row: dict[str, Any], name: str) -> str:
    if f"{name}_mean" not in row:
        return "-"
    return f"{row[f'{name}_mean']:.2f} ± {row[f'{name}_std']:.2f} ({row[f'{name}_median']:.2f})"


def write_markdown(rows: list[dict[str, Any]], path: Path, common: list[str]) -> None:
    agreement = sorted({k for r in rows for k in r if k.startswith("agreement/")})
    head = ["config", "seeds", "last-epoch error % mean ± std (median)",
            "best-epoch error % mean ± std (median)", *agreement]  # fmt: skip
    lines = [f"All runs: `{' '.join(common)}`" if common else "", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]  # fmt: skip
    for r in rows:
        cells = [f"`{r['config']}`", str(r["seeds"]), _cell(r, "last"), _cell(r, "best")]
        cells += [f"{r[k]:.3f}" if k in r else "-" for k in agreement]
        lines.append("| " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def write_plots(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """Median last-epoch error against each swept number (beta, p), one line per other value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for x_key in PLOTTED:
        values = {r[x_key] for r in rows if r[x_key] is not None}
        if len(values) < 2:
            continue
        other = next(k for k in PLOTTED if k != x_key)
        fig, ax = plt.subplots(figsize=(4.5, 3.2))
        for o in sorted({r[other] for r in rows}, key=str):
            pts = sorted((r[x_key], r["last_median"]) for r in rows
                         if r[other] == o and r[x_key] is not None)  # fmt: skip
            ax.plot(*zip(*pts, strict=True), marker="o", label=f"{other.split('.')[-1]}={o}")
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
    return rows


def main(argv: list[str] | None = None) -> int:
    """Console script ``atx-report``."""
    parser = argparse.ArgumentParser(prog="atx-report", description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="a sweep (or any) directory of atx runs")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: root)")
    args = parser.parse_args(argv)
    try:
        rows = report(args.root, args.out)
    except AtxError as e:
        print(f"atx-report: error: {e}", file=sys.stderr)
        return 2
    print((args.out or args.root).joinpath("report.md").read_text(), end="")
    print(f"{len(rows)} configurations written to {(args.out or args.root) / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
