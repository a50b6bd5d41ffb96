"""Batched exact activation patching: K patched variants of a batch stacked along the batch axis and run
in one forward (chunked by ``max_rows``), with the patch-apply kernel writing the other run's activations
into each variant's rows at its component's site.

A *unit* is what one variant patches: ``(site kind, layer, group)``, e.g. ``("head", 3, 5)`` for head 5 of
layer 3 (its slice of the ``o_proj`` input), ``("neuron", 2, 17)``, ``("mlp", 1, 0)``. Patches replace
the activation at every real position (or at ``pos_mask`` positions) by the other run's activation.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch

from mu_fast.data.base import Batch
from mu_fast.localize.inputs import last_logits, repeat_batch
from mu_fast.localize.metrics import Metric
from mu_fast.localize.patch_apply import patch_apply
from mu_fast.localize.sites_hooks import EmbeddingHook, Site, SiteHooks, resolve_sites
from mu_fast.models.sites import SiteTable

Unit = tuple[str, int, int]


def capture_sites(
    model: Any, batch: Batch, sites: Sequence[Site], metric: Metric | None = None, rows: torch.Tensor | None = None,
    embed_fn: Callable[[torch.Tensor], torch.Tensor | None] | None = None,
) -> tuple[dict[Site, torch.Tensor], torch.Tensor | None]:
    """One no-grad forward of ``batch``: activations ``{site: [B, T, F]}`` (copies, model dtype) and, when a
    metric is given, its ``[B]`` values (rows: prompt index of each row, default ``arange(B)``)."""
    acts: dict[Site, torch.Tensor] = {}

    def keep(site: Site, a: torch.Tensor) -> None:
        acts[site] = a.detach().clone()

    with torch.no_grad(), SiteHooks(model, sites, keep), EmbeddingHook(model, embed_fn or (lambda e: None)):
        logits = last_logits(model, batch, None if metric is None else metric.vocab_ids)
    if metric is None:
        return acts, None
    rows = torch.arange(batch.input_ids.shape[0]) if rows is None else rows
    return acts, metric.values(logits, rows, batch)


def sites_for_units(table: SiteTable, units: Sequence[Unit]) -> dict[tuple[str, int], Site]:
    needed = sorted({(kind, layer) for kind, layer, _ in units}, key=lambda x: (x[1], x[0]))
    out = {}
    for kind, layer in needed:
        (site,) = resolve_sites(table, [kind], [layer])
        out[(kind, layer)] = site
    return out


def patched_metric_values(
    model: Any,
    table: SiteTable,
    base: Batch,
    other_acts: dict[Site, torch.Tensor],
    variants: Sequence[Sequence[Unit]],
    metric: Metric,
    rows: torch.Tensor,
    src_rows: torch.Tensor | None = None,
    pos_mask: torch.Tensor | None = None,
    embed_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    backend: str = "auto",
    max_rows: int = 1024,
) -> torch.Tensor:
    """Metric of each patched variant: ``[K, B]`` for K variants of the B-row ``base`` batch.

    variants: K lists of units patched together in that variant (an empty list = the unpatched base).
    other_acts: ``{site: [B_src, T, F]}`` from ``capture_sites`` on the other input; src_rows ``[B]`` maps each
    base row to its source row (default identity). rows ``[B]``: prompt index of each base row for the
    metric. pos_mask ``[B_src, T]`` bool: positions to patch (default: every real token). embed_fn: applied
    to the ``[B, T, d]`` base embeddings before stacking (e.g. causal-tracing noise); it must return the
    embeddings of the B base rows. Runs ``ceil(K·B / max_rows)`` no-grad forwards.
    """
    B = base.input_ids.shape[0]
    device = base.input_ids.device
    src_rows = torch.arange(B, device=device) if src_rows is None else src_rows.to(device)
    site_of = sites_for_units(table, [u for v in variants for u in v])
    per_chunk = max(1, max_rows // max(B, 1))
    results = []
    for start in range(0, len(variants), per_chunk):
        chunk = variants[start : start + per_chunk]
        kc = len(chunk)
        plan: dict[Site, list[tuple[int, int]]] = defaultdict(list)
        for j, units in enumerate(chunk):
            for kind, layer, group in units:
                plan[site_of[(kind, layer)]].append((j, group))
        index = {}
        for site, pairs in plan.items():
            slots = torch.tensor([j for j, _ in pairs], dtype=torch.int64, device=device)
            groups = torch.tensor([g for _, g in pairs], dtype=torch.int64, device=device)
            dst = (slots[:, None] * B + torch.arange(B, device=device)[None, :]).flatten()
            index[site] = (dst, src_rows.repeat(len(pairs)), groups.repeat_interleave(B))

        def apply(site: Site, x: torch.Tensor) -> torch.Tensor | None:
            if site not in index:
                return None
            x = x if x.is_contiguous() else x.contiguous()
            dst, src, groups = index[site]
            other = other_acts[site].to(x.dtype)
            return patch_apply(x, other, dst, src, groups, site.group_size, pos_mask, backend)

        def stacked_embed(e: torch.Tensor) -> torch.Tensor:
            base_e = embed_fn(e[:B])
            return base_e.repeat(kc, 1, 1)

        with torch.no_grad(), SiteHooks(model, list(index), apply), EmbeddingHook(model, stacked_embed if embed_fn else (lambda e: None)):
            big = repeat_batch(base, kc)
            logits = last_logits(model, big, metric.vocab_ids)
        # The metric sees blocks of the n prompts in ``rows`` (a callable metric may not be row-aware).
        n = len(rows)
        first = Batch(base.input_ids[:n], base.attention_mask[:n], base.position_ids[:n], base.last_pos[:n])
        values = torch.cat([metric.values(logits[i : i + n], rows, first) for i in range(0, kc * B, n)])
        results.append(values.view(kc, B))
    return torch.cat(results, 0) if results else torch.zeros(0, B)
