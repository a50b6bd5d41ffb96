"""Attribution patching (AtP), EAP-IG and exact activation patching on plain Hugging Face models.

``attribute(model, clean, corrupt, metric, sites, method, direction)`` scores attention heads, MLPs and MLP
neurons (and q/k/v heads, attention and layer outputs) for a metric read at each prompt's answer position.

Conventions (reference/attribution_anchors.md §2). With base = the run that is patched and other = the run
patched in (``direction="noise"``: base clean, other corrupt; ``"denoise"``: base corrupt, other clean):

    AtP(c)    = Σ_{t, i ∈ c} ∂M/∂a[t, i] |_base · (a_other − a_base)[t, i]
    EAP-IG(c) = Σ_{t, i ∈ c} (1/m) Σ_{k=1..m} ∂M/∂a[t, i] |_{x_k} · (a_other − a_base)[t, i],
                x_k = e_other + (k/m)(e_base − e_other)   (input-embedding interpolation; m = 1 is AtP)
    exact(c)  = M(base with c's activation replaced by other's at every real position) − M(base)

M is the normalised metric (``mu_fast.localize.metrics``). Per-prompt scores are independent of batch
composition and padding side (up to ``normalize="mean"``, whose constants are batch means).

Backends: ``reference`` keeps both runs' site activations and the site gradients (retain_grad) and reduces
after the backward: plain PyTorch, the oracle. ``torch`` / ``triton`` (``auto``: Triton on CUDA) keep only
Δ = a_other − a_base at the sites, written in place during the gradient forward, and reduce g·Δ inside
backward hooks that pass the gradient on unchanged; weights never get gradients; one no-grad forward, one
forward and one input-gradient backward (≈ 6N FLOP/token).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from mu_fast.data.base import Batch
from mu_fast.localize.adapters import unwrap_model
from mu_fast.localize.attribution_reduce import attribution_reduce, attribution_reduce_reference
from mu_fast.localize.checks import NONFINITE_FIX, check_batch, metrics_finite, output_vocab_size, raise_if_not_finite, vocab_size
from mu_fast.localize.inputs import (
    BatchLike,
    aligned_pair,
    row_chunks,
    take_rows,
    default_pad_id,
    frozen,
    last_logits,
    model_device,
    score_dtype,
)
from mu_fast.localize.metrics import Metric, as_metric, normalization_scale
from mu_fast.localize.patching import capture_sites, patched_metric_values
from mu_fast.localize.result import AttributionResult, empty_per_prompt
from mu_fast.localize.sites_hooks import RESULT_KEYS, EmbeddingHook, Site, SiteHooks, parse_site_kinds, resolve_sites
from mu_fast.models.frozen import keep_4bit_differentiable_
from mu_fast.models.sites import SiteTable

__all__ = ["attribute", "AttributionResult"]

METHODS = ("atp", "eap-ig", "exact")
DIRECTIONS = ("denoise", "noise")
BACKENDS = ("auto", "triton", "torch", "reference")
REDUCTIONS = ("mean", "sum")


def attribute(
    model: Any,
    clean: BatchLike,
    corrupt: BatchLike,
    metric: Metric | Callable[..., torch.Tensor],
    sites: str | Sequence[str] = ("head", "mlp", "neuron"),
    method: str = "atp",
    direction: str = "denoise",
    reduce: str = "mean",
    ig_steps: int = 5,
    backend: str = "auto",
    micro_batch: int | None = None,
    max_rows: int = 1024,
    pad_id: int | None = None,
    padding_side: str = "right",
) -> AttributionResult:
    """Score components of ``model`` for ``metric`` between the ``clean`` and ``corrupt`` inputs.

    model: a HF CausalLM of a supported architecture (or a TransformerBridge / nnsight LanguageModel
    wrapping one). clean / corrupt: ``Batch``, ``TokenizedPrompts``, token-id lists or an unpadded ``[B, T]``
    tensor; prompt i of both must have the same length. metric: ``logit_diff`` / ``prob`` / ``logprob`` or
    a row-wise callable ``(last_logits [B, V], batch) -> [B]``. sites: any of ``head, q, k, v, neuron, mlp,
    attn, layer``. method: ``atp``, ``eap-ig`` (``ig_steps`` interpolation steps) or ``exact`` (one patched
    variant per unit, ``max_rows`` rows per forward). micro_batch: prompts per pass (None: all at once).

    Returns an ``AttributionResult`` with ``heads [L, H]``, ``mlp [L]``, ``neurons [L, d_mlp]`` ... in
    float32 (float64 for fp64 models), aggregated over prompts by ``reduce`` ("mean" or "sum").
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}; got {direction!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}; got {reduce!r}")
    if method == "eap-ig" and ig_steps < 1:
        raise ValueError(f"ig_steps must be >= 1; got {ig_steps}")
    model = unwrap_model(model)
    keep_4bit_differentiable_(model)  # a 4-bit layer repacked for CPU inference has no backward
    table = SiteTable(model)
    metric = as_metric(metric)
    kinds = parse_site_kinds(sites)
    device = model_device(model)
    clean_b, corrupt_b = aligned_pair(clean, corrupt, default_pad_id(model) if pad_id is None else pad_id, padding_side)
    check_batch(clean_b, vocab_size(model), "clean")
    check_batch(corrupt_b, vocab_size(model), "corrupt")
    B = clean_b.input_ids.shape[0]
    metric.check(B, output_vocab_size(model))
    clean_b, corrupt_b = clean_b.to(device), corrupt_b.to(device)
    base, other = (clean_b, corrupt_b) if direction == "noise" else (corrupt_b, clean_b)
    site_list = resolve_sites(table, kinds)
    sdtype = score_dtype(model)
    per_prompt = empty_per_prompt(kinds, B, table, sdtype, device)
    m_base = torch.zeros(B, dtype=sdtype, device=device)
    m_other = torch.zeros(B, dtype=sdtype, device=device)
    if micro_batch is not None:
        step = int(micro_batch)
    elif method == "exact":
        step = max(1, max_rows // (1 + sum(site.n_groups for site in site_list)))
    else:
        step = B
    if not metric.row_aware:
        if micro_batch is not None:
            raise ValueError(f"micro_batch needs a row-aware metric; give {metric.name!r} a third argument `rows`")
        step = B
    with frozen(model):
        for rows in row_chunks(base, step):
            b_sub, o_sub = take_rows(base, rows), take_rows(other, rows)
            if method == "exact":
                scores, mb, mo = _exact(model, table, site_list, b_sub, o_sub, metric, rows, backend, max_rows)
            elif backend == "reference":
                scores, mb, mo = _atp_reference(model, site_list, b_sub, o_sub, metric, rows, sdtype, ig_steps if method == "eap-ig" else 1)
            else:
                steps = ig_steps if method == "eap-ig" else 1
                scores, mb, mo = _atp_fused(model, site_list, b_sub, o_sub, metric, rows, sdtype, backend, steps)
            for site, s in scores.items():
                target = per_prompt[RESULT_KEYS[site.kind]]
                if target.dim() == 3:
                    target[rows, site.layer] = s.to(sdtype)
                else:
                    target[rows, site.layer] = s.to(sdtype).reshape(len(rows), -1).sum(1)
            m_base[rows], m_other[rows] = mb.to(sdtype), mo.to(sdtype)
    clean_m, corrupt_m = (m_base, m_other) if direction == "noise" else (m_other, m_base)
    _check_finite(method, clean_m, corrupt_m, per_prompt)
    _, scale = normalization_scale(clean_m, corrupt_m, metric.normalize)
    for key, t in per_prompt.items():
        per_prompt[key] = t * scale.view(-1, *([1] * (t.dim() - 1)))
    replay = dict(model=model, base=base, other=other, metric=metric, scale=scale, m_base=m_base, backend="torch" if backend == "reference" else backend, max_rows=max_rows)
    return AttributionResult(
        per_prompt, table, method, direction, metric.name, metric.normalize, reduce, clean_m, corrupt_m,
        info={"backend": backend, "sites": kinds, "ig_steps": ig_steps if method == "eap-ig" else None}, _replay=replay,
    )


def _check_finite(method: str, clean_m: torch.Tensor, corrupt_m: torch.Tensor, per_prompt: dict[str, torch.Tensor]) -> None:
    """One host sync: raise RuntimeError naming the run and prompts when a metric value or a raw score is
    NaN/inf (they would surface as NaN scores)."""
    ok = metrics_finite(clean_m, corrupt_m, *per_prompt.values())
    if bool(ok):
        return
    where = f"attribute(method={method!r})"
    raise_if_not_finite(where, {"clean": clean_m, "corrupt": corrupt_m}, ok=metrics_finite(clean_m, corrupt_m))
    bad = torch.zeros_like(clean_m, dtype=torch.bool)
    for t in per_prompt.values():
        bad |= ~torch.isfinite(t.reshape(t.shape[0], -1)).all(1)
    idx = bad.nonzero().flatten().tolist()
    raise RuntimeError(
        f"{where}: the scores of {len(idx)} of {bad.numel()} prompts (indices {idx[:8]}{' ...' if len(idx) > 8 else ''}) are "
        "NaN/inf although both runs' metrics are finite: the backward pass (or the patched runs) gave non-finite values; "
        + NONFINITE_FIX
    )


def _atp_fused(
    model: Any, sites: list[Site], base: Batch, other: Batch, metric: Metric, rows: torch.Tensor,
    sdtype: torch.dtype, backend: str, steps: int,
) -> tuple[dict[Site, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Δ-only attribution: returns ``({site: [B, G] raw scores}, m_base [B], m_other [B])``; ``steps`` > 1 is
    EAP-IG over input-embedding interpolation (gradients averaged over k = 1..steps)."""
    B = base.input_ids.shape[0]
    valid = base.attention_mask.to(torch.int8)  # the kernels' mask format, converted once for all sites
    embeds: dict[str, torch.Tensor] = {}

    def keep_embed(name: str) -> Callable[[torch.Tensor], None]:
        def fn(e: torch.Tensor) -> None:
            if steps > 1:
                embeds[name] = e.detach().clone()

        return fn

    deltas, m_other = capture_sites(model, other, sites, metric, rows, embed_fn=keep_embed("other"))
    scores = {site: torch.zeros(B, site.n_groups, dtype=sdtype, device=base.input_ids.device) for site in sites}
    m_base = None
    for k in range(steps, 0, -1):
        first = k == steps
        leaves: list[torch.Tensor] = []

        def probe(site: Site, a: torch.Tensor, first: bool = first, leaves: list = leaves) -> torch.Tensor | None:
            if first:
                deltas[site].sub_(a.detach())  # Δ = a_other − a_base, in place: the only state kept
            new = None
            if not a.requires_grad:  # cut the graph below the lowest site: nothing upstream needs a gradient
                a = new = a.detach().requires_grad_(True)
                leaves.append(a)

            def on_grad(g: torch.Tensor) -> None:
                attribution_reduce(g, deltas[site], scores[site], site.group_size, valid, backend)

            a.register_hook(on_grad)
            return new

        def interpolate(e: torch.Tensor, alpha: float = k / steps) -> torch.Tensor | None:
            if first:
                if steps > 1:
                    embeds["base"] = e.detach().clone()
                return None
            return embeds["other"] + alpha * (embeds["base"] - embeds["other"])

        with torch.enable_grad(), SiteHooks(model, sites, probe), EmbeddingHook(model, interpolate):
            values = metric.values(last_logits(model, base, metric.vocab_ids), rows, base)
        if first:
            m_base = values.detach()
        if leaves and values.requires_grad:
            torch.autograd.grad(values.sum(), leaves, allow_unused=True)
    if steps > 1:
        for s in scores.values():
            s /= steps
    return scores, m_base, m_other


def _atp_reference(
    model: Any, sites: list[Site], base: Batch, other: Batch, metric: Metric, rows: torch.Tensor,
    sdtype: torch.dtype, steps: int,
) -> tuple[dict[Site, torch.Tensor], torch.Tensor, torch.Tensor]:
    """The plain way: cache both runs' activations, retain the site gradients, multiply after backward."""
    B = base.input_ids.shape[0]
    valid = base.attention_mask.bool()
    embeds: dict[str, torch.Tensor] = {}
    acts_other, m_other = capture_sites(model, other, sites, metric, rows, embed_fn=lambda e: embeds.__setitem__("other", e.detach().clone()))
    acts_base, m_base = capture_sites(model, base, sites, metric, rows, embed_fn=lambda e: embeds.__setitem__("base", e.detach().clone()))
    grads = {site: torch.zeros_like(acts_base[site], dtype=sdtype) for site in sites}
    for k in range(1, steps + 1):
        alpha = k / steps
        kept: dict[Site, torch.Tensor] = {}

        def keep(site: Site, a: torch.Tensor) -> torch.Tensor:
            a = a.detach().requires_grad_(True) if not a.requires_grad else a
            a.retain_grad()
            kept[site] = a
            return a

        # k = steps is the base input itself (AtP when steps = 1), run unmodified.
        start = None if k == steps else embeds["other"] + alpha * (embeds["base"] - embeds["other"])
        with torch.enable_grad(), SiteHooks(model, sites, keep), EmbeddingHook(model, lambda e: None if start is None else start.clone()):
            values = metric.values(last_logits(model, base, metric.vocab_ids), rows, base)
            if values.requires_grad:
                values.sum().backward()
        for site in sites:
            if kept[site].grad is not None:
                grads[site] += kept[site].grad.to(sdtype) / steps
    scores = {}
    for site in sites:
        delta = acts_other[site].to(sdtype) - acts_base[site].to(sdtype)
        out = torch.zeros(B, site.n_groups, dtype=sdtype, device=delta.device)
        scores[site] = attribution_reduce_reference(grads[site], delta, out, site.group_size, valid)
    return scores, m_base, m_other


def _exact(
    model: Any, table: SiteTable, sites: list[Site], base: Batch, other: Batch, metric: Metric, rows: torch.Tensor,
    backend: str, max_rows: int,
) -> tuple[dict[Site, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Exact patching of every unit of every site: ``[B, G]`` effects M(patched) − M(base) (raw metric)."""
    other_acts, m_other = capture_sites(model, other, sites, metric, rows)
    units = [(site.kind, site.layer, g) for site in sites for g in range(site.n_groups)]
    variants = [[]] + [[u] for u in units]
    values = patched_metric_values(
        model, table, base, other_acts, variants, metric, rows, pos_mask=other.attention_mask.bool(),
        backend="torch" if backend == "reference" else backend, max_rows=max_rows,
    )
    m_base = values[0]
    effects = values[1:] - m_base[None, :]  # [K, B]
    scores, i = {}, 0
    for site in sites:
        scores[site] = effects[i : i + site.n_groups].T.contiguous()
        i += site.n_groups
    return scores, m_base, m_other
