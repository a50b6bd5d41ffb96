"""Causal tracing (ROME; the paper's CT localizer), batched, for every supported architecture.

Corrupt run: Gaussian noise on the subject's token embeddings (``3sigma`` as in ROME by default, or the
paper code's ``sqrt3sigma``), ``samples`` noise draws per prompt. Restoration: one unit's clean activation
(a head's slice of the ``o_proj`` input, an MLP output, an attention or layer output) copied into the
corrupt run at every real position (``positions="all"``, the paper), at the subject's last token, or at
the answer position. All restorations of a chunk run in one stacked forward (``max_rows`` rows).

Score per prompt: the indirect effect ``p_restored − p_corrupt``, normalised by ``p_clean − p_corrupt``
(``normalize="prompt"``, the paper), then averaged over prompts; p is the metric (default: probability
of the answer token).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mu_fast.data.base import Batch, TokenizedPrompts
from mu_fast.localize.adapters import unwrap_model
from mu_fast.localize.corrupt import noise_scale, subject_embedding_std, subject_mask, subject_noise
from mu_fast.localize.inputs import as_batch, default_pad_id, frozen, model_device, repeat_batch, row_chunks, score_dtype, take_rows
from mu_fast.localize.metrics import Metric, as_metric, normalization_scale, prob
from mu_fast.localize.patching import capture_sites, patched_metric_values
from mu_fast.localize.result import AttributionResult, empty_per_prompt
from mu_fast.localize.sites_hooks import RESULT_KEYS, parse_site_kinds, resolve_sites
from mu_fast.models.sites import SiteTable

POSITIONS = ("all", "subject_last", "last")


def causal_trace(
    model: Any,
    prompts: TokenizedPrompts | Batch,
    sites: str | Sequence[str] = ("head", "mlp"),
    noise: str | float = "3sigma",
    samples: int = 1,
    seed: int = 0,
    metric: Metric | None = None,
    answer_ids: Any = None,
    subject_first: Any = None,
    subject_last: Any = None,
    positions: str = "all",
    normalize: str | None = "prompt",
    embedding_std: float | None = None,
    backend: str = "auto",
    max_rows: int = 1024,
    micro_batch: int | None = None,
    pad_id: int | None = None,
    padding_side: str = "right",
) -> AttributionResult:
    """Causal-tracing scores of ``sites`` (``head``, ``mlp``, ``attn``, ``layer``, ``neuron``, ``q/k/v``).

    prompts: ``TokenizedPrompts`` with subjects (answer ids and subject spans are read from it) or a
    ``Batch`` with ``answer_ids [B]`` and ``subject_first/subject_last [B]`` (inclusive real-token indices).
    samples: noise draws per prompt, averaged (ROME uses 10; 1 keeps the organism-sized call near 2 s of
    one CPU core). positions: where a restoration copies the clean activation (``all`` real tokens, the
    ``subject_last`` token, or the ``last`` token). embedding_std: σ of the noise rule (default: std of this call's subject-token embeddings, as ROME
    computes it over the data). Returns an AttributionResult (method ``causal_tracing``, direction
    ``denoise``) whose ``heads [L, H]``, ``mlp [L]`` ... are mean normalised indirect effects;
    ``clean_metric`` / ``corrupt_metric`` are p_clean and p_corrupt ``[B]`` (averaged over noise samples).
    """
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}; got {positions!r}")
    if samples < 1:
        raise ValueError(f"samples must be >= 1; got {samples}")
    model = unwrap_model(model)
    table = SiteTable(model)
    device = model_device(model)
    pad = default_pad_id(model) if pad_id is None else pad_id
    batch = as_batch(prompts, pad, padding_side, "prompts").to(device)
    B = batch.input_ids.shape[0]
    if isinstance(prompts, TokenizedPrompts):
        answer_ids = prompts.answer_ids if answer_ids is None else answer_ids
        subject_first = prompts.subject_first if subject_first is None else subject_first
        subject_last = prompts.subject_last if subject_last is None else subject_last
    if subject_first is None or subject_last is None:
        raise ValueError("causal_trace needs subject spans: TokenizedPrompts built with subjects, or subject_first/subject_last")
    first = torch.as_tensor(subject_first, dtype=torch.int64)
    last = torch.as_tensor(subject_last, dtype=torch.int64)
    if metric is None:
        if answer_ids is None:
            raise ValueError("causal_trace needs answer_ids (or a metric) to score p(answer)")
        metric = prob(answer_ids, normalize=normalize)
    metric = as_metric(metric)
    metric.check(B)
    kinds = parse_site_kinds(sites)
    site_list = resolve_sites(table, kinds)
    sdtype = score_dtype(model)
    subj = subject_mask(batch, first, last)
    if positions == "all":
        restore_at = batch.attention_mask.bool()
    elif positions == "subject_last":
        restore_at = batch.attention_mask.bool() & (batch.position_ids == last.to(device)[:, None])
    else:
        restore_at = torch.zeros_like(subj)
        restore_at[torch.arange(B, device=device), batch.last_pos] = True

    units = [(s.kind, s.layer, g) for s in site_list for g in range(s.n_groups)]
    variants = [[]] + [[u] for u in units]
    per_prompt = empty_per_prompt(kinds, B, table, sdtype, device)
    p_clean = torch.zeros(B, dtype=sdtype, device=device)
    p_corr = torch.zeros(B, dtype=sdtype, device=device)
    with frozen(model), torch.no_grad():
        embed = model.get_input_embeddings()
        if embedding_std is None:
            embedding_std = subject_embedding_std(embed(batch.input_ids), subj)
        scale = noise_scale(noise, float(embedding_std))
        # Prompts sorted by length, so that each chunk of (variants × samples × prompts) rows pads little.
        step = micro_batch or max(1, max_rows // (len(variants) * samples))
        if not metric.row_aware:
            step = B
        for rows in row_chunks(batch, step):
            sub = take_rows(batch, rows)
            n, T = sub.input_ids.shape
            c0 = int(batch.attention_mask[rows].any(0).nonzero()[0])
            clean_acts, p_clean[rows] = capture_sites(model, sub, site_list, metric, rows)
            noisy = repeat_batch(sub, samples)  # row s·n + i = noise sample s of prompt rows[i]
            mask = subj[rows, c0 : c0 + T]
            # One generator stream per (prompt, sample): scores do not depend on chunking or batch order.
            noise_t = torch.cat(
                [
                    subject_noise((1, T, embed.embedding_dim), mask[i : i + 1], scale, _noise_seed(seed, int(rows[i]), s), embed.weight.dtype, device)
                    for s in range(samples)
                    for i in range(n)
                ]
            )
            values = patched_metric_values(
                model, table, noisy, clean_acts, variants, metric, rows,
                src_rows=torch.arange(n, device=device).repeat(samples), pos_mask=restore_at[rows, c0 : c0 + T],
                embed_fn=lambda e, nz=noise_t: e + nz, backend=backend, max_rows=max_rows,
            )
            values = values.view(len(variants), samples, n).mean(1).to(sdtype)  # average over noise draws
            p_corr[rows] = values[0]
            effects = values[1:] - values[:1]
            i = 0
            for site in site_list:
                e = effects[i : i + site.n_groups].T  # [n, G]
                target = per_prompt[RESULT_KEYS[site.kind]]
                target[rows, site.layer] = e if target.dim() == 3 else e[:, 0]
                i += site.n_groups
    p_clean = p_clean.to(sdtype)
    _, norm = normalization_scale(p_clean, p_corr, metric.normalize)
    for key, t in per_prompt.items():
        per_prompt[key] = t * norm.view(-1, *([1] * (t.dim() - 1)))
    info = {"noise": noise, "noise_scale": scale, "embedding_std": float(embedding_std), "samples": samples, "positions": positions, "sites": kinds}
    return AttributionResult(per_prompt, table, "causal_tracing", "denoise", metric.name, metric.normalize, "mean", p_clean, p_corr, info=info)


def _noise_seed(seed: int, prompt: int, sample: int) -> int:
    return (seed * 1_000_003 + prompt * 10_007 + sample) % (2**63 - 1)
