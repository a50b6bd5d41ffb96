"""Causal tracing (ROME; the paper's CT localizer), batched, for every supported architecture.

Corrupt run: Gaussian noise on the subject's token embeddings (``3sigma`` as in ROME by default, or the
paper code's ``sqrt3sigma``), ``samples`` noise draws per prompt. σ is the std of the subject-token embeddings of
every prompt of the call pooled (ROME); the authors' localizer computes it per prompt, from that prompt's own subject
tokens, and scales each prompt's noise by its own sqrt(3σ): ``noise="sqrt3sigma_per_prompt"``. ``--preset paper``
runs no causal tracing (its CT selections are the authors' committed graphs, made with their per-prompt rule);
``localize("ct")`` uses ROME's pooled ``3sigma``. Restoration: one unit's clean activation
(a head's slice of the ``o_proj`` input, an MLP output, an attention or layer output) copied into the
corrupt run at every real position (``positions="all"``, the paper), at the subject's last token, or at
the answer position. All restorations of a chunk run in one stacked forward (``max_rows`` rows).

Score per prompt: the indirect effect ``p_restored − p_corrupt``, normalised by ``p_clean − p_corrupt``
(``normalize="prompt"``, the paper), then averaged over prompts; p is the metric (default: probability
of the answer token).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mu_fast.data.base import Batch, TokenizedPrompts
from mu_fast.localize.adapters import unwrap_model
from mu_fast.localize.checks import check_batch, check_subject_spans, metrics_finite, output_vocab_size, raise_if_not_finite, vocab_size
from mu_fast.localize.corrupt import PER_PROMPT_RULES, noise_scale, subject_embedding_std, subject_mask, subject_noise_rows
from mu_fast.localize.inputs import as_batch, default_pad_id, frozen, model_device, repeat_batch, row_chunks, score_dtype, take_rows
from mu_fast.localize.metrics import Metric, as_metric, normalization_scale, prob
from mu_fast.localize.patching import capture_sites, patched_metric_values
from mu_fast.localize.result import AttributionResult, empty_per_prompt
from mu_fast.localize.sites_hooks import RESULT_KEYS, parse_site_kinds, resolve_sites
from mu_fast.models.sites import SiteTable

POSITIONS = ("all", "subject_last", "last")


@dataclass
class TraceInputs:
    """What every causal-tracing call needs, checked before any forward: the model, its site table, the
    padded ``batch``, inclusive real-token subject spans ``first/last [B]``, the metric and the noise scale (one float,
    or one per prompt for a per-prompt rule, with ``embedding_std`` likewise)."""

    model: Any
    table: SiteTable
    batch: Batch
    first: torch.Tensor
    last: torch.Tensor
    metric: Metric
    scale: float | list[float]
    embedding_std: float | list[float]
    score_dtype: torch.dtype

    def noised(self, rows: torch.Tensor, samples: int, seed: int) -> tuple[Batch, torch.Tensor]:
        """Prompts ``rows`` (columns padded in all of them dropped), ``samples`` copies stacked (row s·n + i
        is noise sample s of prompt rows[i]), and their subject noise ``[samples·n, T, d]``."""
        sub = take_rows(self.batch, rows)
        noisy = repeat_batch(sub, samples)
        # One generator stream per (prompt, sample): scores do not depend on chunking, order or padding side.
        seeds = [_noise_seed(seed, int(i), s) for s in range(samples) for i in rows.tolist()]
        embed = self.model.get_input_embeddings()
        first, last = self.first[rows.cpu()].repeat(samples), self.last[rows.cpu()].repeat(samples)
        if isinstance(self.scale, list):  # per prompt: unit noise from the same seeds, times each prompt's scale
            per_row = torch.tensor([self.scale[i] for i in rows.tolist()], dtype=torch.float64).repeat(samples)
            unit = subject_noise_rows(noisy, first, last, embed.embedding_dim, 1.0, seeds, torch.float64, "cpu")
            return noisy, (unit * per_row[:, None, None]).to(device=noisy.input_ids.device, dtype=embed.weight.dtype)
        noise = subject_noise_rows(noisy, first, last, embed.embedding_dim, self.scale, seeds, embed.weight.dtype, noisy.input_ids.device)
        return noisy, noise


def prepare_trace(
    model: Any, prompts: TokenizedPrompts | Batch, noise: str | float, metric: Metric | None, answer_ids: Any,
    subject_first: Any, subject_last: Any, normalize: str | None, embedding_std: float | None, pad_id: int | None,
    padding_side: str,
) -> TraceInputs:
    """Resolve and check causal-tracing inputs (token ids, answer positions and ids, subject spans) before
    any forward; σ of the noise rule is the std of the subject-token embeddings unless given (per prompt for
    ``sqrt3sigma_per_prompt``, which takes no ``embedding_std``)."""
    model = unwrap_model(model)
    table = SiteTable(model)
    device = model_device(model)
    pad = default_pad_id(model) if pad_id is None else pad_id
    batch = as_batch(prompts, pad, padding_side, "prompts")
    check_batch(batch, vocab_size(model), "prompts")
    B = batch.input_ids.shape[0]
    if isinstance(prompts, TokenizedPrompts):
        answer_ids = prompts.answer_ids if answer_ids is None else answer_ids
        subject_first = prompts.subject_first if subject_first is None else subject_first
        subject_last = prompts.subject_last if subject_last is None else subject_last
    if subject_first is None or subject_last is None:
        raise ValueError("causal tracing needs subject spans: TokenizedPrompts built with subjects, or subject_first/subject_last")
    first = torch.as_tensor(subject_first, dtype=torch.int64).cpu()
    last = torch.as_tensor(subject_last, dtype=torch.int64).cpu()
    check_subject_spans(batch, first, last)
    if metric is None:
        if answer_ids is None:
            raise ValueError("causal tracing needs answer_ids (or a metric) to score p(answer)")
        metric = prob(answer_ids, normalize=normalize)
    metric = as_metric(metric)
    metric.check(B, output_vocab_size(model))
    noise_scale(noise, 1.0)  # reject an unknown rule before the embedding forward
    per_prompt = noise in PER_PROMPT_RULES
    if per_prompt and embedding_std is not None:
        raise ValueError(f"noise={noise!r} takes σ from each prompt's own subject tokens; drop embedding_std= (or use "
                         "noise='sqrt3sigma' for one given σ)")
    batch = batch.to(device)
    if per_prompt:
        with torch.no_grad():
            embeddings, mask = model.get_input_embeddings()(batch.input_ids), subject_mask(batch, first, last)
            stds = [subject_embedding_std(embeddings[i : i + 1], mask[i : i + 1]) for i in range(B)]
        return TraceInputs(model, table, batch, first, last, metric, [noise_scale(noise, s) for s in stds], stds,
                           score_dtype(model))
    if embedding_std is None:
        with torch.no_grad():
            embedding_std = subject_embedding_std(model.get_input_embeddings()(batch.input_ids), subject_mask(batch, first, last))
    scale = noise_scale(noise, float(embedding_std))
    return TraceInputs(model, table, batch, first, last, metric, scale, float(embedding_std), score_dtype(model))


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
    computes it over the data). noise: ``3sigma`` (ROME), ``sqrt3sigma`` (the paper code's scale, pooled σ),
    ``sqrt3sigma_per_prompt`` (the paper code's: each prompt's σ from its own subject tokens) or a number. Returns an AttributionResult (method ``causal_tracing``, direction
    ``denoise``) whose ``heads [L, H]``, ``mlp [L]`` ... are mean normalised indirect effects;
    ``clean_metric`` / ``corrupt_metric`` are p_clean and p_corrupt ``[B]`` (averaged over noise samples).
    ``result.verify()`` re-measures the top units' restorations with unchunked full forwards.
    For the per-position × per-layer grid of ROME's plots, see ``causal_trace_grid``.
    """
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}; got {positions!r}")
    if samples < 1:
        raise ValueError(f"samples must be >= 1; got {samples}")
    kinds = parse_site_kinds(sites)
    inp = prepare_trace(model, prompts, noise, metric, answer_ids, subject_first, subject_last, normalize, embedding_std, pad_id, padding_side)
    model, table, batch, metric, sdtype = inp.model, inp.table, inp.batch, inp.metric, inp.score_dtype
    device = batch.input_ids.device
    B = batch.input_ids.shape[0]
    site_list = resolve_sites(table, kinds)
    if positions == "all":
        restore_at = batch.attention_mask.bool()
    elif positions == "subject_last":
        restore_at = batch.attention_mask.bool() & (batch.position_ids == inp.last.to(device)[:, None])
    else:
        restore_at = torch.zeros_like(batch.attention_mask, dtype=torch.bool)
        restore_at[torch.arange(B, device=device), batch.last_pos] = True

    units = [(s.kind, s.layer, g) for s in site_list for g in range(s.n_groups)]
    variants = [[]] + [[u] for u in units]
    per_prompt = empty_per_prompt(kinds, B, table, sdtype, device)
    p_clean = torch.zeros(B, dtype=sdtype, device=device)
    p_corr = torch.zeros(B, dtype=sdtype, device=device)
    with frozen(model), torch.no_grad():
        # Prompts sorted by length, so that each chunk of (variants × samples × prompts) rows pads little.
        step = micro_batch or max(1, max_rows // (len(variants) * samples))
        if not metric.row_aware:
            step = B
        for rows in row_chunks(batch, step):
            sub = take_rows(batch, rows)
            n, T = sub.input_ids.shape
            c0 = int(batch.attention_mask[rows].any(0).nonzero()[0])
            clean_acts, p_clean[rows] = capture_sites(model, sub, site_list, metric, rows)
            noisy, noise_t = inp.noised(rows, samples, seed)
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
    restored = torch.cat([t.reshape(B, -1) for t in per_prompt.values()], 1)
    raise_if_not_finite("causal_trace", {"clean": p_clean, "noised": p_corr, "restored": restored}, metrics_finite(p_clean, p_corr, restored))
    _, norm = normalization_scale(p_clean, p_corr, metric.normalize)
    for key, t in per_prompt.items():
        per_prompt[key] = t * norm.view(-1, *([1] * (t.dim() - 1)))
    info = {"noise": noise, "noise_scale": inp.scale, "embedding_std": inp.embedding_std, "samples": samples, "positions": positions, "sites": kinds}
    replay = dict(
        kind="causal_trace", model=model, batch=batch, metric=metric, inputs=inp, samples=samples, seed=seed,
        restore_at=restore_at, scale=norm, backend=backend, max_rows=max_rows,
    )
    return AttributionResult(per_prompt, table, "causal_tracing", "denoise", metric.name, metric.normalize, "mean", p_clean, p_corr, info=info, _replay=replay)


def _noise_seed(seed: int, prompt: int, sample: int) -> int:
    return (seed * 1_000_003 + prompt * 10_007 + sample) % (2**63 - 1)
