"""Verification of attribution scores against batched exact patching (``AttributionResult.verify``).

This module sits below ``mu_fast.localize.result``, which calls it: ``verify_result`` takes the result as an argument
and imports nothing from there."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mu_fast.localize.checks import raise_if_not_finite
from mu_fast.localize.inputs import frozen, take_rows
from mu_fast.localize.patching import Unit, capture_sites, patched_metric_values, sites_for_units
from mu_fast.localize.sites_hooks import unit_label
from mu_fast.models.sites import SiteTable


def _ranks(x: torch.Tensor) -> torch.Tensor:
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(len(x), dtype=x.dtype)
    # average ranks of ties so that Spearman is exact with repeated values
    for value in torch.unique(x):
        tied = x == value
        if int(tied.sum()) > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    denom = float(a.norm() * b.norm())
    return float((a * b).sum()) / denom if denom > 0 else float("nan")


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    return pearson(_ranks(a.double()), _ranks(b.double()))


@dataclass
class VerifyReport:
    """Attribution vs exact patching on ``labels`` (top-k by |attribution| first, then random units).

    attribution / exact: ``[n]`` aggregated scores of the same normalised metric. spearman / pearson: over
    all n. topk_recall: fraction of the k largest |attribution| that are among the k largest |exact|
    (within the n checked). sign_agreement: fraction of the top-k whose signs agree.
    """

    labels: list[str]
    attribution: torch.Tensor
    exact: torch.Tensor
    k: int
    spearman: float
    pearson: float
    topk_recall: float
    sign_agreement: float

    def __repr__(self) -> str:
        return (
            f"VerifyReport(n={len(self.labels)}, k={self.k}, spearman={self.spearman:.3f}, pearson={self.pearson:.3f}, "
            f"topk_recall={self.topk_recall:.3f}, sign_agreement={self.sign_agreement:.3f})"
        )


def verify_result(result: Any, k: int, n_random: int, sites: str | tuple[str, ...] | None, seed: int) -> VerifyReport:
    """``AttributionResult.verify`` of ``result`` (an ``AttributionResult`` that keeps its inputs)."""
    replay = result._replay
    kinds = None if sites is None else ((sites,) if isinstance(sites, str) else tuple(sites))
    units = [u for u in result.units() if kinds is None or u[0] in kinds]
    if not units:
        raise ValueError(f"no scored units of kinds {kinds}; the result has {sorted(result.per_prompt)}")
    k = max(1, min(k, len(units)))
    ranked = sorted(units, key=lambda u: -abs(u[3]))
    top, rest = ranked[:k], ranked[k:]
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(rest), generator=gen)[: max(0, n_random)].tolist()
    chosen = top + [rest[i] for i in sorted(pick)]
    if replay.get("kind") == "causal_trace":
        values = _restored_values(result.table, replay, [(u[0], u[1], u[2]) for u in chosen])
        where = "verify (causal trace)"
    else:
        model, base, other, metric = replay["model"], replay["base"], replay["other"], replay["metric"]
        rows = torch.arange(base.input_ids.shape[0], device=base.input_ids.device)
        needed = list(sites_for_units(result.table, [(u[0], u[1], u[2]) for u in chosen]).values())
        other_acts, _ = capture_sites(model, other, needed)
        variants = [[]] + [[(u[0], u[1], u[2])] for u in chosen]
        values = patched_metric_values(
            model, result.table, base, other_acts, variants, metric, rows, pos_mask=other.attention_mask.bool(),
            backend=replay["backend"], max_rows=replay["max_rows"],
        )
        where = f"verify ({result.method})"
    raise_if_not_finite(where, {"base": values[0], "patched": values[1:].T})
    effects = (values[1:] - values[:1]) * replay["scale"].to(values.dtype)[None, :]  # [n, B]
    exact = effects.mean(1) if result.reduce == "mean" else effects.sum(1)
    attribution = torch.tensor([u[3] for u in chosen], dtype=exact.dtype)
    exact = exact.cpu()
    top_exact = set(torch.argsort(exact.abs(), descending=True)[:k].tolist())
    recall = len(top_exact & set(range(k))) / k
    signs = float((torch.sign(attribution[:k]) == torch.sign(exact[:k])).double().mean())
    return VerifyReport(
        [unit_label(*u[:3]) for u in chosen], attribution, exact, k, spearman(attribution, exact), pearson(attribution, exact), recall, signs
    )


def _restored_values(table: SiteTable, replay: dict, units: list[Unit]) -> torch.Tensor:
    """``[1 + n, B]`` metric of the noised run and of each unit restored alone, averaged over the noise
    samples: every prompt in one batch, full forwards (no prefix reuse), the same noise as the trace."""
    inp, samples, batch, metric = replay["inputs"], replay["samples"], replay["batch"], replay["metric"]
    B = batch.input_ids.shape[0]
    rows = torch.arange(B, device=batch.input_ids.device)
    with frozen(inp.model), torch.no_grad():
        sub = take_rows(batch, rows)  # as the trace ran: columns that are padding in every row dropped
        c0, T = int(batch.attention_mask.any(0).nonzero()[0]), sub.input_ids.shape[1]
        clean_acts, _ = capture_sites(inp.model, sub, list(sites_for_units(table, units).values()))
        noisy, noise = inp.noised(rows, samples, replay["seed"])
        values = patched_metric_values(
            inp.model, table, noisy, clean_acts, [[]] + [[u] for u in units], metric, rows,
            src_rows=rows.repeat(samples), pos_mask=replay["restore_at"][:, c0 : c0 + T], embed_fn=lambda e: e + noise,
            backend=replay["backend"], max_rows=replay["max_rows"], reuse_prefix=False,
        )
    return values.view(len(units) + 1, samples, B).mean(1)
