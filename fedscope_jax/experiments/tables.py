"""Reading run directories and aggregating them: groups of runs that differ only in the seed -> mean and std.

A run directory holds summary.json, config.json, metrics.jsonl (any trainer's) and, when `fedscope reproduce`
wrote it, cell.json (its study cell). Runs without cell.json (single runs, sweeps) get a cell inferred from
their config. Tables are long-format: one row per (cell group, domain); Markdown shows "mean ± std", CSV has
separate mean and std columns. std is the sample standard deviation over seeds (n - 1; "-" for one seed).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from fedscope_jax.errors import FedscopeError
from fedscope_jax.experiments.methods import METHODS, vector_arms
from fedscope_jax.experiments.spec import NO_DP_LABELS, dp_label
from fedscope_jax.train.config import flatten
from fedscope_jax.utils.io import read_json

METRICS = (("HR@10", "sampled"), ("NDCG@10", "sampled"), ("MRR", "sampled"), ("NDCG@10", "full"))
GROUP_FIELDS = ("dataset", "method", "dp", "variant", "attributes", "dry_run")


@dataclasses.dataclass
class Run:
    """One finished run directory."""

    path: Path
    cell: dict[str, Any]
    config: dict[str, Any]
    summary: dict[str, Any]

    @property
    def group(self) -> tuple[Any, ...]:
        return tuple(_hashable(self.cell.get(f)) for f in GROUP_FIELDS)

    def metrics(self) -> list[dict[str, Any]]:
        path = self.path / "metrics.jsonl"
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _hashable(v: Any) -> Any:
    return json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v


IGNORED_FOR_GROUPING = ("train.seed", "federated.seed", "federated.chunk_size", "federated.checkpoint_every",
                        # a sweep member's facts that the seed or the DP label already say (the label tells a
                        # distributed sweep's eps-inf point, "off-distributed", from a local-noise sweep's)
                        "sweep.name", "sweep.seed", "sweep.epsilon", "sweep.privacy_mode", "sweep.same_as",
                        "sweep.mode")


def infer_cell(config: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    """A cell description for a run that `fedscope reproduce` did not write (single run or sweep member)."""
    mode = config.get("mode") or summary.get("training", {}).get("mode", "?")
    privacy = config.get("privacy", {}) if mode == "federated" else {}
    pmode = privacy.get("mode", "off")
    distributed = config.get("sweep", {}).get("mode") == "distributed"   # its eps-inf point: "off-distributed"
    dp = "n/a" if mode != "federated" else dp_label(pmode, privacy.get("epsilon"), privacy.get("unit", "client"),
                                                    distributed)
    flat = {k: v for k, v in flatten(config).items() if k not in IGNORED_FOR_GROUPING and not k.startswith("experiment")
            and k not in ("privacy.mode", "privacy.epsilon")}
    digest = hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:6]
    attributes = config.get("attributes")
    return {"dataset": summary.get("dataset", {}).get("name") or "?", "method": mode, "label": mode,
            "mode": mode, "dp": dp, "privacy_mode": pmode if mode == "federated" else None,
            "epsilon": privacy.get("epsilon") if pmode != "off" and mode == "federated" else None,
            "variant": f"config {digest}", "variant_axis": "", "variant_value": None,
            "seed": config.get("train", {}).get("seed"), "profile": None, "dry_run": False,
            "attributes": "none" if not attributes else str(attributes)}


def load_run(path: Path) -> Run:
    summary = read_json(path / "summary.json")
    config = read_json(path / "config.json") if (path / "config.json").is_file() else {}
    cell = read_json(path / "cell.json") if (path / "cell.json").is_file() else infer_cell(config, summary)
    if "test" not in summary:
        raise FedscopeError(f"{path / 'summary.json'}: no 'test' section (expected a training run's summary)")
    return Run(path, cell, config, summary)


def _is_copy(run: Path) -> bool:
    """A sweep writes a configuration that is the same run as another (eps inf under several modes) as a
    copy (config.json sweep.same_as): counted once."""
    try:
        return bool(read_json(run / "config.json").get("sweep", {}).get("same_as"))
    except FedscopeError:
        return False


def run_dirs(cell_dir: Path) -> list[Path]:
    """The finished run directories of a cell directory (a sweep directory holds one per configuration)."""
    if (cell_dir / "summary.json").is_file():
        return [cell_dir]
    if cell_dir.is_dir():
        return sorted(p for p in cell_dir.iterdir() if (p / "summary.json").is_file() and not _is_copy(p))
    return []


def find_runs(root: Path) -> list[Path]:
    """Every run directory (a folder with summary.json) under `root`; sweep copies skipped."""
    return sorted(p.parent for p in root.rglob("summary.json")
                  if "checkpoints" not in p.parts and not _is_copy(p.parent))


@dataclasses.dataclass
class Group:
    """Runs of one cell over seeds."""

    cell: dict[str, Any]
    runs: list[Run]

    @property
    def seeds(self) -> list[Any]:
        return sorted(r.cell.get("seed") for r in self.runs)

    def domains(self) -> list[str]:
        return list(self.runs[0].summary["test"])

    def values(self, domain: str, metric: str, protocol: str = "sampled") -> np.ndarray:
        section = "test" if protocol == "sampled" else "test_full"
        return np.array([float(r.summary.get(section, {}).get(domain, {}).get(metric, math.nan)) for r in self.runs])

    def mean_over_domains(self, metric: str, protocol: str = "sampled") -> np.ndarray:
        """Per-run mean over domains (one value per seed)."""
        return np.nanmean(np.stack([self.values(d, metric, protocol) for d in self.domains()]), axis=0)

    def privacy_unit(self) -> str:
        """What one DP record is in this group's numbers: "user" or "client" ("-" without DP). Read from the
        runs' config.json (a config written before the user unit existed is client-level)."""
        if self.cell.get("dp") in ("n/a", None, *NO_DP_LABELS):
            return "-"
        units = {r.config.get("privacy", {}).get("unit", "client") for r in self.runs}
        return "/".join(sorted(units))

    def selection(self) -> str:
        """How the tested model was chosen: "best valid" (the best validated round or epoch, early stopping;
        local-only: each client's own) or "final" (the last round: private runs, and federated runs written
        before runs selected)."""
        labels = set()
        for r in self.runs:
            tr = r.summary.get("training", {})
            best = tr.get("selection") == "best_valid" or "best_epoch" in tr or tr.get("mode") == "local"
            labels.add("best valid" if best else "final")
        return "/".join(sorted(labels))

    def protocol(self) -> str:
        """The evaluation protocol of the runs' numbers (`eval.protocol`; summaries from before it: fedscope)."""
        return "/".join(sorted({r.summary.get("protocol", {}).get("name", "fedscope") for r in self.runs}))

    def best_at(self) -> str:
        """The tested round or epoch of each seed ("30/35/40"; "-" for a final-model selection, "per client" for
        local-only runs whose clients each chose their own epoch)."""
        vals = []
        for r in self.runs:
            tr = r.summary.get("training", {})
            at = tr.get("best_round") or tr.get("best_epoch")
            vals.append(str(at) if at else ("per client" if tr.get("mode") == "local" else "-"))
        return "/".join(vals)

    def eps_spent(self) -> np.ndarray:
        vals = [r.summary.get("privacy", {}).get("eps_spent_median") for r in self.runs]
        return np.array([math.nan if v is None else float(v) for v in vals])


def group_runs(runs: Iterable[Run]) -> list[Group]:
    groups: dict[tuple[Any, ...], Group] = {}
    for run in runs:
        groups.setdefault(run.group, Group(run.cell, [])).runs.append(run)
    return list(groups.values())


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample std) ignoring NaN; std NaN with fewer than two values."""
    v = np.asarray([x for x in values if not math.isnan(x)], float)
    if not v.size:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else math.nan


def fmt(mean: float, std: float, digits: int = 4) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.{digits}f}" + ("" if math.isnan(std) else f" ± {std:.{digits}f}")


def metric_rows(groups: Sequence[Group]) -> list[dict[str, Any]]:
    """Long-format rows: one per (group, domain), mean and std over seeds of each metric."""
    rows = []
    for g in groups:
        c = g.cell
        for domain in g.domains():
            row: dict[str, Any] = {"dataset": c.get("dataset"), "method": c.get("label", c.get("method")),
                                   "dp": c.get("dp"), "unit": g.privacy_unit(), "variant": c.get("variant"),
                                   "domain": domain, "attributes": _short_attr(c.get("attributes"), c.get("method")),
                                   "seeds": len(g.runs)}
            for metric, proto in METRICS:
                name = metric if proto == "sampled" else f"{metric} (full)"
                row[name] = mean_std(g.values(domain, metric, proto))
            row["eps_spent (median)"] = mean_std(g.eps_spent())
            row["selection"] = g.selection()
            row["protocol"] = g.protocol()
            row["tested round/epoch"] = g.best_at()
            rows.append(row)
    return rows


def popularity_rows(groups: Sequence[Group]) -> list[dict[str, Any]]:
    """One reference row per (dataset, domain): the popularity ranking (train interaction counts) on the same
    test targets and candidates, read from a run's summary `baselines` (equal in every run of the dataset)."""
    rows, seen = [], set()
    for g in groups:
        ds = g.cell.get("dataset")
        base = g.runs[0].summary.get("baselines", {})
        if ds in seen or "popularity" not in base:
            continue
        seen.add(ds)
        for domain in g.domains():
            row: dict[str, Any] = {"dataset": ds, "method": "Popularity (reference)", "dp": "n/a", "unit": "-",
                                   "variant": "-",
                                   "domain": domain, "attributes": "-", "seeds": "-"}
            for metric, proto in METRICS:
                name = metric if proto == "sampled" else f"{metric} (full)"
                section = base.get("popularity" if proto == "sampled" else "popularity_full", {})
                row[name] = (float(section.get(domain, {}).get(metric, math.nan)), math.nan)
            row["eps_spent (median)"] = (math.nan, math.nan)
            row["selection"] = "-"
            row["protocol"] = g.protocol()
            row["tested round/epoch"] = "-"
            rows.append(row)
    return rows


def below_popularity(groups: Sequence[Group], metric: str = "NDCG@10") -> list[tuple[Group, str, float, float]]:
    """(group, domain, mean over seeds, popularity) of each trained cell whose mean test `metric` (sampled) is at
    or below the popularity ranking's on the same targets: a trained model there needs a reason (the report
    lists them with their validation curves)."""
    out = []
    for g in groups:
        if g.cell.get("dry_run"):     # plumbing only: its numbers mean nothing
            continue
        pop = g.runs[0].summary.get("baselines", {}).get("popularity", {})
        for domain in g.domains():
            mean, _ = mean_std(g.values(domain, metric))
            ref = pop.get(domain, {}).get(metric)
            if ref is not None and not math.isnan(mean) and mean <= float(ref):
                out.append((g, domain, mean, float(ref)))
    return out


VECTOR_ORDER = ("LLM", "title", "none")


def vector_rows(groups: Sequence[Group], metric: str = "NDCG@10") -> list[dict[str, Any]]:
    """What the item vectors add, paired by seed: for FedSCOPE's arms that differ in their vectors alone
    (`methods.vector_arms`: LLM attributes, title vectors, ID only) under the same dataset, DP setting and
    variant, one row per pair of kinds and domain with the per-seed difference A - B of `metric` (mean ± sample
    std over the seeds both ran; sampled and full ranking) and the ratio of the two means. Seeds only one arm
    ran are left out; a pair with no common seed gives no row."""
    arms = set(vector_arms())
    by_setting: dict[tuple[Any, ...], dict[str, Group]] = {}
    for g in groups:
        c = g.cell
        if c.get("method") not in arms or c.get("dry_run"):
            continue
        kind = _short_attr(c.get("attributes"), c.get("method"))
        key = (c.get("dataset"), c.get("dp"), c.get("variant"))
        by_setting.setdefault(key, {}).setdefault(kind, g)
    rows = []
    for (dataset, dp, variant), kinds in by_setting.items():
        present = [k for k in VECTOR_ORDER if k in kinds]
        for i, a in enumerate(present):
            for b in present[i + 1:]:
                ga, gb = kinds[a], kinds[b]
                sa = {r.cell.get("seed"): r for r in ga.runs}
                sb = {r.cell.get("seed"): r for r in gb.runs}
                seeds = sorted(set(sa) & set(sb), key=str)
                if not seeds:
                    continue
                pa, pb = Group(ga.cell, [sa[s] for s in seeds]), Group(gb.cell, [sb[s] for s in seeds])
                for domain in ga.domains():
                    row: dict[str, Any] = {"dataset": dataset, "dp": dp, "variant": variant, "domain": domain,
                                           "A vs B": f"{a} vs {b}", "seeds": len(seeds)}
                    for proto, prefix in (("sampled", ""), ("full", "full: ")):
                        va, vb = pa.values(domain, metric, proto), pb.values(domain, metric, proto)
                        stats_a, stats_b = mean_std(va), mean_std(vb)
                        row[f"{prefix}{metric} A"], row[f"{prefix}{metric} B"] = stats_a, stats_b
                        row[f"{prefix}A - B"] = mean_std(va - vb)
                        ratio = stats_a[0] / stats_b[0] if stats_b[0] > 0 else math.nan
                        row[f"{prefix}A / B"] = f"{ratio:.3f}" if math.isfinite(ratio) else "-"
                    rows.append(row)
    return rows


def _short_attr(attr: Any, method: Any = None) -> str:
    """The attributes column: "none", or which item vectors the run read ("LLM" or "title")."""
    if not attr:
        return "none"
    text = str(attr)
    if text.startswith("none"):
        return text.split(" (")[0]
    return "title" if method in METHODS and METHODS[method].vectors == "title" else "LLM"


def write_tables(rows: list[dict[str, Any]], stem: Path, columns: Sequence[str] | None = None) -> str:
    """Writes stem.md and stem.csv; returns the Markdown text. (mean, std) cells become 'm ± s' / two columns."""
    if not rows:
        text = "_no finished runs_\n"
        stem.with_suffix(".md").write_text(text, encoding="utf-8")
        stem.with_suffix(".csv").write_text("", encoding="utf-8")
        return text
    columns = list(columns or rows[0].keys())
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = []
        for col in columns:
            v = r.get(col)
            cells.append(fmt(*v) if isinstance(v, tuple) else ("-" if v is None else str(v)))
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    stem.with_suffix(".md").write_text(text, encoding="utf-8")
    with open(stem.with_suffix(".csv"), "w", newline="", encoding="utf-8") as f:
        header = []
        for col in columns:
            header += [f"{col} mean", f"{col} std"] if isinstance(rows[0].get(col), tuple) else [col]
        w = csv.writer(f)
        w.writerow(header)
        for r in rows:
            out = []
            for col in columns:
                v = r.get(col)
                out += [f"{v[0]:.6g}", f"{v[1]:.6g}"] if isinstance(v, tuple) else ["" if v is None else v]
            w.writerow(out)
    return text


def breakdown_rows(groups: Sequence[Group], section: str, metric: str = "NDCG@10") -> list[dict[str, Any]]:
    """Rows of summary[section], sampled protocol: the model's metric per bucket (mean ± std over seeds) and
    the bucket's target count. Reads both layouts: cold_start {domain: {bucket: {"targets", "model": {...}}}}
    and long_tail {domain: {"head": {...}, "tail": {...}, "targets": {"head": n, "tail": n}}}."""
    rows = []
    for g in groups:
        parts = [r.summary.get(section) for r in g.runs]
        if any(not isinstance(p, dict) for p in parts):
            continue
        c = g.cell
        first = parts[0].get("sampled", parts[0])
        for domain, buckets in first.items():
            for bucket, entry in buckets.items():
                if not isinstance(entry, dict) or not isinstance(entry.get("model", entry).get(metric, None),
                                                                (int, float)):
                    continue
                vals = []
                for p in parts:
                    e = p.get("sampled", p).get(domain, {}).get(bucket, {})
                    vals.append(float(e.get("model", e).get(metric, math.nan)))
                counts = buckets.get("targets")
                count = counts.get(bucket, "-") if isinstance(counts, dict) else entry.get("targets", "-")
                rows.append({"dataset": c.get("dataset"), "method": c.get("label", c.get("method")),
                             "dp": c.get("dp"), "domain": domain, "bucket": bucket, "targets": count,
                             metric: mean_std(vals), "seeds": len(g.runs)})
    return rows
