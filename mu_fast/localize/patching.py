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
from mu_fast.models.forward import head_logits, trunk_hidden
from mu_fast.localize.metrics import Metric
from mu_fast.localize.patch_apply import patch_apply
from mu_fast.localize.sites_hooks import EmbeddingHook, Site, SiteHooks, resolve_sites
from mu_fast.models.sites import SiteTable, get_submodule

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


@torch.no_grad()
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
    reuse_prefix: bool = True,
) -> torch.Tensor:
    """Metric of each patched variant: ``[K, B]`` for K variants of the B-row ``base`` batch.

    variants: K lists of units patched together in that variant (an empty list = the unpatched base).
    other_acts: ``{site: [B_src, T, F]}`` from ``capture_sites`` on the other input; src_rows ``[B]`` maps each
    base row to its source row (default identity). rows ``[n]``: prompt index of the first n base rows;
    base rows repeat with period n (e.g. several noise samples of n prompts). pos_mask ``[B_src, T]`` bool:
    positions to patch (default: every position). embed_fn: applied to the ``[B, T, d]`` base embeddings
    (e.g. causal-tracing noise).

    reuse_prefix: a patch in layer l leaves layers < l as in the base run, so the base run is done once
    with each decoder layer's inputs kept, and a variant whose earliest patch is in layer l runs only
    layers l..L-1 (saves ~half the layer evaluations for patches spread over depth). Off: every chunk runs
    the whole model. Chunks hold at most ``max_rows`` rows.
    """
    B = base.input_ids.shape[0]
    device = base.input_ids.device
    src_rows = torch.arange(B, device=device) if src_rows is None else src_rows.to(device)
    site_of = sites_for_units(table, [u for v in variants for u in v])
    per_chunk = max(1, max_rows // max(B, 1))
    n = len(rows)
    first_rows = Batch(base.input_ids[:n], base.attention_mask[:n], base.position_ids[:n], base.last_pos[:n])

    def metric_of(logits: torch.Tensor, kc: int) -> torch.Tensor:
        # The metric sees blocks of the n prompts in ``rows`` (a callable metric may not be row-aware).
        return torch.cat([metric.values(logits[i : i + n], rows, first_rows) for i in range(0, kc * B, n)]).view(kc, B)

    prefix = _LayerInputs(model, table, base, embed_fn) if reuse_prefix and len(variants) > 1 else None
    start_of = [min((u[1] for u in v), default=table.n_layers) for v in variants]
    order = sorted(range(len(variants)), key=lambda i: start_of[i]) if prefix else list(range(len(variants)))
    out = torch.empty(len(variants), B, dtype=torch.float64, device=device)
    done = torch.zeros(len(variants), dtype=torch.bool)
    if prefix is not None:
        for i in order:
            if not variants[i]:
                out[i] = metric_of(prefix.logits(metric.vocab_ids), 1)[0].double()
                done[i] = True
        order = [i for i in order if not done[i]]
    pos = 0
    while pos < len(order):
        chunk_ids = order[pos : pos + per_chunk]
        if prefix is not None:  # a chunk shares one start layer
            chunk_ids = [i for i in chunk_ids if start_of[i] == start_of[chunk_ids[0]]]
        pos += len(chunk_ids)
        chunk = [variants[i] for i in chunk_ids]
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

        def apply(site: Site, x: torch.Tensor, index: dict = index) -> torch.Tensor | None:
            if site not in index:
                return None
            x = x if x.is_contiguous() else x.contiguous()
            dst, src, groups = index[site]
            return patch_apply(x, other_acts[site].to(x.dtype), dst, src, groups, site.group_size, pos_mask, backend)

        with torch.no_grad(), SiteHooks(model, list(index), apply):
            if prefix is not None:
                logits = prefix.run_suffix(start_of[chunk_ids[0]], kc, metric.vocab_ids)
            else:
                embed = (lambda e, kc=kc: embed_fn(e[:B]).repeat(kc, 1, 1)) if embed_fn else (lambda e: None)
                with EmbeddingHook(model, embed):
                    logits = last_logits(model, repeat_batch(base, kc), metric.vocab_ids)
        out[chunk_ids] = metric_of(logits, kc).double()
    return out


def _repeat_rows(value: Any, B: int, times: int) -> Any:
    """Tensors with a leading batch dimension of B (and at least 2 dims) repeated ``times`` along it."""
    if isinstance(value, torch.Tensor):
        if value.dim() >= 2 and value.shape[0] == B and times > 1:
            return value.repeat(times, *([1] * (value.dim() - 1)))
        return value
    if isinstance(value, (tuple, list)):
        return type(value)(_repeat_rows(v, B, times) for v in value)
    if isinstance(value, dict):
        return {k: _repeat_rows(v, B, times) for k, v in value.items()}
    return value


class _LayerInputs:
    """The base run with every decoder layer's call arguments kept (no-grad), and suffix replays from it.

    Uses only forward pre-hooks (with kwargs) on the decoder layers and calls of the layer modules, the
    final norm and the LM head, so it follows whatever the installed transformers passes to its layers.
    """

    def __init__(self, model: Any, table: SiteTable, base: Batch, embed_fn: Callable[[torch.Tensor], torch.Tensor] | None):
        self.model, self.table, self.base = model, table, base
        self.B = base.input_ids.shape[0]
        self.layers = [get_submodule(model, table.layer_path(L)) for L in range(table.n_layers)]
        self.norm = get_submodule(model, table.spec.final_norm)
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any]] | None] = [None] * table.n_layers
        handles = []
        for L, layer in enumerate(self.layers):
            def keep(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], L: int = L) -> None:
                self.calls[L] = (args, dict(kwargs))

            handles.append(layer.register_forward_pre_hook(keep, with_kwargs=True))
        try:
            with torch.no_grad(), EmbeddingHook(model, embed_fn or (lambda e: None)):
                self.hidden = trunk_hidden(model, base)
        finally:
            for h in handles:
                h.remove()
        if any(c is None for c in self.calls):
            raise RuntimeError("a decoder layer was not called in the base run; pass reuse_prefix=False")

    def logits(self, vocab_ids: torch.Tensor | None) -> torch.Tensor:
        rows = torch.arange(self.B, device=self.hidden.device)
        out = head_logits(self.model, self.hidden[rows, self.base.last_pos], vocab_ids)
        return out.to(torch.promote_types(out.dtype, torch.float32))

    def run_suffix(self, start: int, times: int, vocab_ids: torch.Tensor | None) -> torch.Tensor:
        """Logits ``[times·B, V_sub]`` at the answer positions after running layers ``start..L-1`` on
        ``times`` stacked copies of the base run's input to layer ``start``."""
        hidden = None
        for L in range(start, len(self.layers)):
            args, kwargs = self.calls[L]
            args = _repeat_rows(args, self.B, times)
            kwargs = _repeat_rows(kwargs, self.B, times)
            if hidden is not None:
                if args:
                    args = (hidden, *args[1:])
                else:
                    kwargs["hidden_states"] = hidden
            out = self.layers[L](*args, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        if hidden is None:  # no layer left: patches at/after the last layer output
            hidden = _repeat_rows(self.calls[-1][0][0] if self.calls[-1][0] else self.calls[-1][1]["hidden_states"], self.B, times)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        last = self.norm(hidden[rows, self.base.last_pos.repeat(times)])
        out = head_logits(self.model, last, vocab_ids)
        return out.to(torch.promote_types(out.dtype, torch.float32))
