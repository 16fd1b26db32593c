"""Reading a sweep's rows: best-of-learning-rate selection, markdown tables, and line plots.

Zoology's protocol reports, for each cell of a grid, the best learning rate's accuracy. :func:`best_over` implements
it for any grouping: within each cell it keeps the learning rate whose mean (over seeds) of the chosen metric is best,
and returns that learning rate's per-seed values, so every seed stays visible.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def best_over(
    rows: Iterable[Mapping[str, Any]],
    cell: Sequence[str],
    metric: str,
    *,
    over: str = "learning_rate",
    higher_is_better: bool = True,
    where: Callable[[Mapping[str, Any]], bool] | None = None,
) -> list[dict[str, Any]]:
    """One summary per cell: the value of ``over`` with the best mean ``metric`` over seeds, and that value's seeds.

    Args:
      rows: result rows (:func:`hybrid_jax.experiments.run_sweep`).
      cell: the columns that define a cell (e.g. ``("model", "d_model", "K")``).
      metric: the column to optimise and report (e.g. ``"accuracy"``).
      over: the column to choose within a cell (default: the learning rate).
      higher_is_better: direction of ``metric``; non-finite values (a diverged member) count as the worst.
      where: optional row filter.

    Returns:
      Dicts with the cell's columns, ``over`` (the chosen value), ``mean``, ``std`` (over seeds), ``seeds`` (the
      per-seed values, in seed order), ``n`` and ``candidates`` (mean per value of ``over``), sorted by cell.
    """
    groups: dict[tuple, dict[Any, dict[int, float]]] = {}
    for r in rows:
        if where is not None and not where(r):
            continue
        key = tuple(r.get(c) for c in cell)
        groups.setdefault(key, {}).setdefault(r[over], {})[r.get("seed", 0)] = r.get(metric)
    worst = -math.inf if higher_is_better else math.inf
    out = []
    for key in sorted(groups, key=lambda k: tuple((v is None, str(type(v)), v) for v in k)):
        means = {}
        for value, by_seed in groups[key].items():
            vals = [v if _finite(v) else worst for v in by_seed.values()]
            means[value] = float(np.mean(vals))
        pick = (max if higher_is_better else min)(means, key=lambda v: means[v])
        seeds = groups[key][pick]
        vals = [seeds[s] for s in sorted(seeds)]
        finite = [v for v in vals if _finite(v)]
        out.append(
            {
                **dict(zip(cell, key)),
                over: pick,
                "mean": float(np.mean(finite)) if len(finite) == len(vals) and vals else float("nan"),
                "std": float(np.std(finite)) if len(finite) == len(vals) and len(vals) > 1 else 0.0,
                "seeds": vals,
                "n": len(vals),
                "candidates": {str(k): v for k, v in sorted(means.items(), key=lambda kv: str(kv[0]))},
            }
        )
    return out


def chosen_at(
    rows: Iterable[Mapping[str, Any]],
    group: Sequence[str],
    metric: str,
    reference: Callable[[Mapping[str, Any]], bool],
    *,
    over: str = "learning_rate",
    higher_is_better: bool = True,
) -> list[dict[str, Any]]:
    """The rows of the value of ``over`` chosen per ``group`` on the ``reference`` rows only.

    For extrapolation: the learning rate is chosen by accuracy at the training length, and then every length is
    reported at that learning rate (choosing per length would select on the test set).
    """
    rows = list(rows)
    picks = {
        tuple(s[c] for c in group): s[over]
        for s in best_over(rows, group, metric, over=over, higher_is_better=higher_is_better, where=reference)
    }
    return [r for r in rows if picks.get(tuple(r.get(c) for c in group)) == r[over]]


def unfinished(results: Mapping[str, Any]) -> list[str]:
    """Report lines naming every job that is not done (status and first error line); empty when all are."""
    failed = {k: j for k, j in results["jobs"].items() if j.get("status") != "done"}
    if not failed:
        return []
    return ["", "Not finished: " + "; ".join(f"{k} ({j['status']}: {j.get('error', '')})" for k, j in failed.items())]


def fmt(value, digits: int = 3) -> str:
    """A table cell: numbers with ``digits`` significant digits, non-finite as '-', others as text."""
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "nan" if math.isnan(value) else str(value)
        return f"{value:.{digits}g}"
    if isinstance(value, (list, tuple)):
        return "/".join(fmt(v, digits) for v in value)
    return str(value)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], digits: int = 3) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v, digits) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def pivot_table(
    summaries: Sequence[Mapping[str, Any]],
    row_keys: Sequence[str],
    column_key: str,
    value: Callable[[Mapping[str, Any]], Any],
    digits: int = 3,
    column_label: Callable[[Any], str] = str,
) -> str:
    """A markdown table with one row per distinct ``row_keys`` and one column per value of ``column_key``."""
    columns = sorted({s[column_key] for s in summaries}, key=lambda v: (str(type(v)), v))
    table: dict[tuple, dict[Any, Any]] = {}
    for s in summaries:
        table.setdefault(tuple(s[k] for k in row_keys), {})[s[column_key]] = value(s)
    headers = [*row_keys, *(column_label(c) for c in columns)]
    body = [[*key, *(table[key].get(c) for c in columns)] for key in table]
    return markdown_table(headers, body, digits)


def pyplot():
    """``matplotlib.pyplot``, on the Agg backend (files only) unless a backend was chosen already (a notebook's inline
    backend, through ``MPLBACKEND`` or an earlier pyplot import, is kept).

    Raises:
      ImportError: matplotlib is missing (it is the ``experiments`` extra), with the install command.
    """
    try:
        import matplotlib
    except ImportError:
        raise ImportError(
            "the experiment plots need matplotlib: pip install 'hybrid_jax[experiments]' (or matplotlib)"
        ) from None
    if "matplotlib.pyplot" not in sys.modules and not os.environ.get("MPLBACKEND"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def line_panels(
    series: Mapping[str, Mapping[str, Sequence[tuple[float, float, float]]]],
    path: str,
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
    logx: bool = False,
    ylim: tuple[float, float] | None = None,
    reference: Mapping[str, Mapping[str, Sequence[tuple[float, float]]]] | None = None,
) -> str:
    """Saves a figure with one panel per key of ``series`` and one line per model in each.

    Args:
      series: panel title -> line label -> points ``(x, y, y_err)`` (y_err 0 for none).
      path: the PNG to write.
      xlabel, ylabel, title: labels; ``title`` is the figure's.
      logx: log-scaled x axis (base 2).
      ylim: y range.
      reference: panel -> label -> ``(x, y)`` points drawn dashed (e.g. a paper's numbers).

    Returns:
      ``path``.
    """
    plt = pyplot()

    panels = list(series)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.0), squeeze=False, sharey=True)
    for ax, panel in zip(axes[0], panels):
        for label, points in series[panel].items():
            pts = sorted(points)
            xs = [p[0] for p in pts]
            ys = [p[1] for p in pts]
            errs = [p[2] if len(p) > 2 else 0.0 for p in pts]
            ax.errorbar(xs, ys, yerr=errs if any(errs) else None, marker="o", ms=4, capsize=2, label=label)
        for label, points in (reference or {}).get(panel, {}).items():
            pts = sorted(points)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "--", color="gray", label=label)
        ax.set_title(panel)
        ax.set_xlabel(xlabel)
        if logx:
            ax.set_xscale("log", base=2)
        if ylim is not None:
            ax.set_ylim(*ylim)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    # One legend when every panel has the same lines, else one per panel (e.g. an LM with two SALs next to MQAR's one).
    labels = [tuple(ax.get_legend_handles_labels()[1]) for ax in axes[0]]
    for ax, own in zip(axes[0], labels):
        if own and (own != labels[-1] or ax is axes[0][-1]):
            ax.legend(fontsize=8, loc="best")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def bar_chart(
    values: Mapping[str, tuple[float, float]],
    path: str,
    *,
    ylabel: str,
    title: str = "",
    reference: Mapping[str, float] | None = None,
    reference_label: str = "paper",
    ylim: tuple[float, float] | None = None,
) -> str:
    """Saves a bar chart: label -> (value, error); ``reference`` values (e.g. a paper's) as black markers."""
    plt = pyplot()

    labels = list(values)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(labels) + 2), 3.8))
    xs = np.arange(len(labels))
    ax.bar(xs, [values[k][0] for k in labels], yerr=[values[k][1] for k in labels], capsize=3, color="tab:blue")
    if reference:
        ref = [(i, reference[k]) for i, k in enumerate(labels) if k in reference]
        if ref:
            ax.plot([i for i, _ in ref], [v for _, v in ref], "kD", label=reference_label)
            ax.legend(fontsize=8)
    ax.set_xticks(xs)
    ax.set_xticklabels(labels, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    if title:
        ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = [
    "bar_chart",
    "best_over",
    "chosen_at",
    "fmt",
    "line_panels",
    "markdown_table",
    "pivot_table",
    "pyplot",
    "unfinished",
]
