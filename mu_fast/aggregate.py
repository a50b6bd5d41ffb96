"""Several seeds of one method folded into one row: mean ± sample std of every summary number, and the spread of
what each seed selected (``mu_fast.sweep.compare``).

Seeds matter because much of a run is random: AtP / CT corrupt prompts with noise, the random baselines draw their
components, FLU's probes and the latent probes are trained from random initialisations, the edit draws its batch
order and the relearning attack its LoRA initialisation and batches. On the organism one seed's AtP and CT rows moved
by more than the gaps between methods, so a comparison without the spread says nothing.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from mu_fast.stats import mean_std

# The table the demo prints over several seeds: "0.87±0.03" cells are wider than single numbers, so the columns
# that repeat another are left to results.json (edit acc ~ forget err for a 4-way sport edit; MCQ edit and
# paraphrase edit ~ MCQ err and Q/A edit), to stay within 100 columns.
DEMO_COLUMNS = ("trainable_params", "forget_err", "maintain_acc", "qa_edit_acc", "mcq_forget_err", "other_attr_acc",
                "relearn_acc", "probe_true_acc")


def aggregate_runs(runs: Mapping[int, Mapping[str, Any]], n_layers: int) -> dict[str, Any]:
    """One method's runs ``{seed: record}`` as ``{"summary": means, "std": stds, "n_seeds", "selections": {seed:
    components}, "flu_layers": {seed: layers}, "layer_fractions": mean over seeds, "localization" / "edit": the first
    seed's, "provenance", "runs": {str(seed): record}}``. Integer counts (trainable parameters) stay integers when every seed has
    the same one."""
    if not runs:
        raise ValueError("aggregate_runs needs at least one seed's record")
    seeds = sorted(runs)
    first = runs[seeds[0]]
    keys = sorted({k for r in runs.values() for k, v in r["summary"].items() if isinstance(v, (int, float))})
    summary: dict[str, Any] = {}
    std: dict[str, Any] = {}
    for key in keys:
        values = [r["summary"][key] for r in runs.values() if isinstance(r["summary"].get(key), (int, float))]
        mean, spread = mean_std(values)
        if all(isinstance(v, int) for v in values) and len(set(values)) == 1:
            summary[key] = values[0]
        else:
            summary[key] = mean
        if spread is not None:
            std[key] = spread
    fractions: dict[str, list[float]] = {}
    for kind in ("attn", "mlp"):
        rows = [list(r.get("layer_fractions", {}).get(kind, [0.0] * n_layers)) for r in runs.values()]
        fractions[kind] = [statistics.fmean(col) for col in zip(*rows)] if rows else [0.0] * n_layers
    return {"summary": summary, "std": std, "n_seeds": len(seeds),
            "selections": {str(s): list(runs[s].get("localization", {}).get("components", [])) for s in seeds},
            "flu_layers": {str(s): runs[s].get("flu_layers") for s in seeds},
            "layer_fractions": fractions, "localization": first.get("localization"), "edit": first.get("edit"),
            "provenance": first.get("provenance"),
            "runs": {str(s): dict(runs[s]) for s in seeds}}


def selection_spread(selections: Mapping[str, Sequence[str]]) -> str:
    """``"a0 3/3, m1 3/3, a2 1/3"``: each component with the number of seeds that selected it, most often first."""
    n = len(selections)
    counts = Counter(c for comps in selections.values() for c in set(comps))
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return ", ".join(f"{c} {k}/{n}" for c, k in ordered)


def selection_lines(methods: Mapping[str, Mapping[str, Any]], n_seeds: int, width: int = 100,
                    max_components: int = 8) -> list[str]:
    """Lines under the table: which components each method selected over the seeds (only methods whose selection
    is not the same on every seed are spelled out component by component; the rest say so)."""
    if n_seeds < 2:
        return []
    lines = [f"selections over {n_seeds} seeds (component: seeds that picked it):"]
    for method, agg in methods.items():
        sel = agg.get("selections") or {}
        distinct = {tuple(sorted(c)) for c in sel.values()}
        if len(distinct) == 1:
            comps = next(iter(distinct))
            shown = ", ".join(comps[:max_components]) + (f", … ({len(comps)})" if len(comps) > max_components else "")
            text = f"  {method}: the same on every seed: {shown}"
        else:
            parts = selection_spread(sel).split(", ")
            head = f"  {method}: "
            for k in range(min(len(parts), max_components), 0, -1):
                rest = f", … ({len(parts)} in all)" if k < len(parts) else ""
                text = head + ", ".join(parts[:k]) + rest
                if len(text) <= width:
                    break
        lines.append(text if len(text) <= width else text[: width - 1] + "…")
    return lines


def same_selection_notes(methods: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Say which methods chose exactly the same components as an earlier one (their rows then repeat it),
    e.g. random-MLPs drawing FLU's layer on a 4-layer model: a coincidence the reader should not mistake for
    two methods agreeing independently."""
    notes, seen = [], {}
    for method, record in methods.items():
        comps = tuple(sorted(record.get("localization", {}).get("components", [])))
        if not comps:
            continue
        if comps in seen:
            notes.append(f"{method} selected the same components as {seen[comps]} ({', '.join(comps)}); "
                         f"its row repeats that edit")
        else:
            seen[comps] = method
    return notes


# What the paired comparison looks at: the edit's strength and collateral damage, and the robustness metrics the
# paper's question is about. (summary key, column heading, "+1" when higher is better for the edit, else "-1")
PAIRED_METRICS = (("forget_err", "forget err ↑", 1), ("maintain_acc", "maint acc ↑", 1),
                  ("mcq_forget_err", "MCQ err ↑", 1), ("relearn_acc", "relearn acc ↓", -1),
                  ("probe_true_acc", "probe acc ↓", -1))


def paired_comparison(runs: Mapping[str, Mapping[int, Mapping[str, Any]]], reference: str = "flu",
                      metrics: Sequence[tuple[str, str, int]] = PAIRED_METRICS, confidence: float = 0.95,
                      ) -> dict[str, Any]:
    """Every other method against ``reference`` on the same seeds: per metric, the mean of (method − reference) over
    the seeds both ran, its t interval and p-value, whether the interval excludes 0, and whether that survives Holm's
    correction over all the comparisons made. ``runs``: ``{method: {seed: record with "summary"}}``."""
    from mu_fast.stats import holm, paired_differences

    if reference not in runs:
        raise ValueError(f"the paired comparison's reference {reference!r} is not among the methods {sorted(runs)}")
    ref = runs[reference]
    rows: dict[str, dict[str, Any]] = {}
    p_values: dict[str, float] = {}
    for method, seeds in runs.items():
        if method == reference:
            continue
        row = {}
        for key, _, _ in metrics:
            a = {s: r["summary"][key] for s, r in seeds.items() if isinstance(r["summary"].get(key), (int, float))}
            b = {s: r["summary"][key] for s, r in ref.items() if isinstance(r["summary"].get(key), (int, float))}
            if len(set(a) & set(b)) < 2:
                continue
            interval = paired_differences(a, b, confidence)
            row[key] = {**interval.to_dict(), "excludes_zero": interval.excludes_zero}
            if interval.p_value is not None:
                p_values[f"{method}/{key}"] = interval.p_value
        rows[method] = row
    survives = holm(p_values, 1.0 - confidence)
    for method, row in rows.items():
        for key, cell in row.items():
            cell["holm"] = survives.get(f"{method}/{key}", False)
    return {"reference": reference, "confidence": confidence, "comparisons": len(p_values), "methods": rows}


def paired_lines(paired: Mapping[str, Any], metrics: Sequence[tuple[str, str, int]] = PAIRED_METRICS) -> list[str]:
    """The paired comparison as lines under the table (at most 100 columns)."""
    rows = paired["methods"]
    if not any(rows.values()):
        return []
    ref, n_cmp = paired["reference"], paired["comparisons"]
    n = max((c["n"] for row in rows.values() for c in row.values()), default=0)
    level = round(100 * paired["confidence"])
    lines = [f"paired with {ref} on the same seeds: method − {ref}, mean ± {level}% t half-width over {n} seeds",
             f"(* interval excludes 0; ** also after Holm's correction over the {n_cmp} comparisons)",
             f"{'method':<14}" + "".join(f"{heading:>15}" for _, heading, _ in metrics)]
    for method, row in rows.items():
        cells = []
        for key, _, _ in metrics:
            cell = row.get(key)
            if cell is None:
                cells.append(f"{'—':>15}")
                continue
            mark = "**" if cell["holm"] else "*" if cell["excludes_zero"] else ""
            cells.append(f"{cell['mean']:+.2f}±{(cell['hi'] - cell['lo']) / 2:.2f}{mark:<2}".rjust(15))
        lines.append(f"{method:<14}" + "".join(cells))
    return lines


def paired_verdicts(paired: Mapping[str, Any], metrics: Sequence[tuple[str, str, int]] = PAIRED_METRICS) -> list[str]:
    """What the paired comparison says, in words: the differences from the reference that survive Holm's correction
    (method, metric, direction), or that none does, with the count of uncorrected 95% intervals that exclude 0."""
    ref, n_cmp = paired["reference"], paired["comparisons"]
    names = {key: heading.rstrip(" ↑↓") for key, heading, _ in metrics}
    sure, loose = [], 0
    for method, row in paired["methods"].items():
        for key, cell in row.items():
            loose += bool(cell["excludes_zero"])
            if cell["holm"]:
                sure.append(f"{method} {'higher' if cell['mean'] > 0 else 'lower'} {names.get(key, key)} "
                            f"({cell['mean']:+.2f})")
    level = round(100 * paired["confidence"])
    if not sure:
        return [f"after Holm's correction no method differs from {ref} on any metric at {level}% ({loose} of the "
                f"{n_cmp} uncorrected intervals exclude 0: suggestive, not established)"]
    return [f"distinguishable from {ref} at {level}% after Holm's correction: " + "; ".join(sure),
            f"the other {n_cmp - len(sure)} comparisons are not ({loose - len(sure)} of them only uncorrected)"]
