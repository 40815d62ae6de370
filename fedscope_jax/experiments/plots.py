"""PNG plots (matplotlib, Agg backend): privacy-utility, convergence, cold-start bars, variants, engine scaling.

Every function takes aggregated groups (tables.Group) and a file name, draws mean over seeds with the sample
std as error bars / bands, and returns the path written (None when there is nothing to draw).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from fedscope_jax.experiments.tables import Group, mean_std


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def privacy_series(groups: Sequence[Group]) -> tuple[dict[str, list[tuple[float, float, float]]],
                                                      list[tuple[str, float, float]]]:
    """The privacy-utility plot's data: ({"[method: ]mode (unit unit)": [(eps, mean, std)]}, [("[method: ]dp",
    mean, std)] of the runs without DP); the method prefixes only when the groups hold several methods."""
    by_mode: dict[str, list[tuple[float, float, float]]] = {}
    nodp: list[tuple[str, float, float]] = []
    methods = {g.cell.get("method") for g in groups}
    for g in groups:
        m, s = mean_std(g.mean_over_domains("NDCG@10"))
        eps, mode = g.cell.get("epsilon"), g.cell.get("privacy_mode")
        who = f"{g.cell.get('label', g.cell.get('method'))}: " if len(methods) > 1 else ""
        if mode in (None, "off") or eps is None:
            nodp.append((f"{who}{g.cell.get('dp')}", m, s))
        else:
            by_mode.setdefault(f"{who}{mode} ({g.privacy_unit()} unit)", []).append((float(eps), m, s))
    return by_mode, nodp


def privacy_utility(groups: Sequence[Group], path: Path, title: str) -> Path | None:
    """NDCG@10 (sampled, mean over domains) against epsilon, one line per privacy mode and unit (and method, when
    the study has several); eps inf = no DP (dashed)."""
    by_mode, nodp = privacy_series(groups)
    if not by_mode and not nodp:
        return None
    methods = {g.cell.get("method") for g in groups}
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    # several methods: one colour per method, one line style per mode and unit
    who_of = lambda name: name.rpartition(": ")[0]  # noqa: E731
    colors = {w: f"C{i}" for i, w in enumerate(dict.fromkeys(who_of(n) for n in [*by_mode, *(d for d, _, _ in nodp)]))}
    styles = {m: s for m, s in zip(dict.fromkeys(n.rpartition(": ")[2] for n in by_mode), ("-", "--", "-.", ":") * 4)}
    for mode, pts in sorted(by_mode.items()):
        pts.sort()
        x, y, e = (np.array(v) for v in zip(*pts))
        style = {"color": colors[who_of(mode)], "ls": styles[mode.rpartition(": ")[2]]} if len(methods) > 1 else {}
        ax.errorbar(x, y, yerr=np.nan_to_num(e), marker="o", capsize=3, label=mode, **style)
    names = {"off": ("no DP (eps inf)", "k"), "off-user": ("user-unit training, no clip/noise", "tab:gray"),
             "off-distributed": ("distributed training, no clip/noise", "tab:olive")}
    for dp, m, s in sorted(nodp)[:len(names) * len(methods)]:
        who, _, bare = dp.rpartition(": ")
        label, color = names.get(bare, (f"{bare} (eps inf)", "k"))
        label, color = (f"{who}: {label}", colors[who]) if who else (label, color)
        ax.axhline(m, ls={"off": "--", "off-distributed": "-."}.get(bare, ":"), color=color, label=label)
        if not math.isnan(s):
            ax.axhspan(m - s, m + s, color=color, alpha=0.08)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("epsilon (per record of the unit, whole run)")
    ax.set_ylabel("test NDCG@10 (sampled, mean of domains)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def curve(run: Any) -> tuple[np.ndarray, np.ndarray]:
    """(x, validation score) of one run: rounds (federated) or epochs; score = 'select' (mean NDCG@10).
    Local-only runs log one line per (client, epoch) on the client's own validation users: the curve is
    the mean over the clients that reached that epoch (they stop early at different epochs)."""
    points: dict[float, list[float]] = {}
    for rec in run.metrics():
        valid = rec.get("valid")
        score = rec.get("select")
        if score is None and isinstance(valid, dict):
            score = valid.get("select")
        if score is None or not np.isfinite(float(score)):
            continue
        x = rec.get("round", rec.get("epoch", len(points) + 1))
        points.setdefault(float(x), []).append(float(score))
    xs = sorted(points)
    return np.array(xs, float), np.array([np.mean(points[x]) for x in xs], float)


def group_label(g: Group) -> str:
    """"METHOD (dp)", plus the variant where the cell has one ("FedSCOPE (off) clients=50")."""
    variant = g.cell.get("variant")
    return (f"{g.cell.get('label', g.cell.get('method'))} ({g.cell.get('dp')})"
            + (f" {variant}" if variant not in (None, "", "base") else ""))


def seed_band(curves: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, ...]:
    """(x, mean, min, max) over seeds of (x, y) curves, on every x any seed reached: a seed that stopped early
    (patience) leaves the later points to the seeds still running, instead of cutting every curve short."""
    x = np.unique(np.concatenate([c[0] for c in curves]))
    y = np.full((len(curves), x.size), np.nan)
    for i, (cx, cy) in enumerate(curves):
        y[i, np.searchsorted(x, cx)] = cy
    return x, np.nanmean(y, 0), np.nanmin(y, 0), np.nanmax(y, 0)


def convergence(groups: Sequence[Group], path: Path, title: str) -> Path | None:
    """Validation metric per round / epoch, one line per group (mean over the seeds that reached it, band =
    min..max)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = 0
    for g in groups:
        curves = [c for c in (curve(r) for r in g.runs) if c[0].size]
        if not curves:
            continue
        x, mean, lo, hi = seed_band(curves)
        ax.plot(x, mean, marker="." if x.size < 40 else None, label=group_label(g))
        if len(curves) > 1:
            ax.fill_between(x, lo, hi, alpha=0.15)
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("round (federated) / epoch (local, centralized)")
    ax.set_ylabel("validation NDCG@10 (sampled, mean of domains)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def breakdown_bars(rows: Sequence[dict[str, Any]], path: Path, title: str, metric: str = "NDCG@10") -> Path | None:
    """Grouped bars: one panel per domain, buckets on x, one bar per (method, dp)."""
    if not rows:
        return None
    plt = _plt()
    domains = list(dict.fromkeys(r["domain"] for r in rows))
    fig, axes = plt.subplots(1, len(domains), figsize=(5.5 * len(domains), 3.8), squeeze=False)
    for ax, dom in zip(axes[0], domains):
        sub = [r for r in rows if r["domain"] == dom]
        buckets = list(dict.fromkeys(r["bucket"] for r in sub))
        series = list(dict.fromkeys(f"{r['method']} ({r['dp']})" for r in sub))
        width = 0.8 / max(len(series), 1)
        for i, name in enumerate(series):
            vals = {r["bucket"]: r[metric] for r in sub if f"{r['method']} ({r['dp']})" == name}
            m = np.array([vals.get(b, (math.nan, math.nan))[0] for b in buckets])
            s = np.array([vals.get(b, (math.nan, math.nan))[1] for b in buckets])
            ax.bar(np.arange(len(buckets)) + i * width, np.nan_to_num(m), width, yerr=np.nan_to_num(s), capsize=2,
                   label=name)
        targets = {r["bucket"]: r["targets"] for r in sub}
        ax.set_xticks(np.arange(len(buckets)) + 0.4 - width / 2)
        ax.set_xticklabels([f"{b}\n(n={targets[b]})" for b in buckets], fontsize=8)
        ax.set_title(f"{title}: {dom}")
        ax.set_ylabel(f"test {metric} (sampled)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def variants(groups: Sequence[Group], path: Path, title: str) -> Path | None:
    """NDCG@10 against the varied key of each variant axis (one panel per axis, e.g. clients / fraction)."""
    by_axis: dict[str, list[tuple[float, float, float]]] = {}
    for g in groups:
        axis, value = g.cell.get("variant_axis"), g.cell.get("variant_value")
        if not axis or value is None:
            continue
        m, s = mean_std(g.mean_over_domains("NDCG@10"))
        by_axis.setdefault(axis, []).append((float(value), m, s))
    if not by_axis:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(by_axis), figsize=(5 * len(by_axis), 3.6), squeeze=False)
    for ax, (axis, pts) in zip(axes[0], sorted(by_axis.items())):
        pts.sort()
        x, y, e = (np.array(v) for v in zip(*pts))
        ax.errorbar(x, y, yerr=np.nan_to_num(e), marker="o", capsize=3)
        ax.set_xlabel(axis)
        ax.set_ylabel("test NDCG@10 (sampled, mean of domains)")
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def engine_scaling(bench: dict[str, Any], path: Path) -> Path | None:
    """Speedup of the vectorized engine over the sequential reference against the number of clients."""
    results = [r for r in bench.get("results", []) if "clients" in r and "speedup" in r]
    if not results:
        return None
    plt = _plt()
    results.sort(key=lambda r: r["clients"])
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.plot([r["clients"] for r in results], [r["speedup"] for r in results], marker="o")
    ax.axhline(1.0, ls="--", color="k", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("clients per round")
    ax.set_ylabel("speedup vs sequential reference")
    ax.set_title(f"engine scaling ({bench.get('device', '?')})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
