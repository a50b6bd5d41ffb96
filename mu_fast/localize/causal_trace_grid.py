"""The per-position × per-layer causal-tracing grid of ROME's plots.

Corrupt run as in ``causal_trace`` (Gaussian noise on the subject's token embeddings, the same seeds, so
``corrupt_metric`` is the same). Restoration ``(t, l)``: the clean activation of ``kind`` (``layer`` output =
hidden state, ``mlp`` output or ``attn`` output) at real token ``t`` only, in the layers of a window around
``l`` (``window`` layers, ROME's rule: ``max(0, l - window // 2)`` up to ``min(L, l + ceil(window / 2))``;
ROME restores MLP/attention outputs with a window of 10 and hidden states with 1). Every restoration of a
chunk runs in one stacked forward of at most ``max_rows`` rows, the layers below the window replayed from
the corrupt run once (``patching._LayerInputs``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from mu_fast.data.base import Batch, TokenizedPrompts
from mu_fast.localize.causal_tracing import TraceInputs, prepare_trace
from mu_fast.localize.checks import metrics_finite, raise_if_not_finite
from mu_fast.localize.inputs import frozen, row_chunks, take_rows
from mu_fast.localize.metrics import Metric, normalization_scale
from mu_fast.localize.patching import _LayerInputs, capture_sites
from mu_fast.localize.sites_hooks import Site, SiteHooks, resolve_sites

GRID_KINDS = ("layer", "mlp", "attn")
TOKEN_KINDS = ("before subject", "first subject", "middle subject", "last subject", "first after subject", "further", "last")


def window_layers(layer: int, window: int, n_layers: int) -> range:
    """Layers restored for grid column ``layer``: ``window`` layers centred on it (ROME), clipped to the model."""
    return range(max(0, layer - window // 2), min(n_layers, layer + math.ceil(window / 2)))


@dataclass
class CausalTraceGrid:
    """Indirect effects of restoring one token position in a window of layers.

    restored: ``[B, T, L]`` metric (p of the answer by default) with position t restored in the window of
    layer l, averaged over noise samples; T is the longest prompt and entries at t >= lengths[i] are NaN.
    clean_metric / corrupt_metric: ``[B]``. ``effects`` is ``(restored - corrupt) * scale`` (scale from
    ``normalize``: 1 for None, ``1 / (clean - corrupt)`` per prompt for "prompt"). Positions index each
    prompt's real tokens (0 = its first token, whatever the padding side).
    """

    kind: str
    window: int
    restored: torch.Tensor
    clean_metric: torch.Tensor
    corrupt_metric: torch.Tensor
    lengths: torch.Tensor
    subject_first: torch.Tensor
    subject_last: torch.Tensor
    input_ids: list[list[int]]
    normalize: str | None
    scale: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def effects(self) -> torch.Tensor:
        """``[B, T, L]`` indirect effects (normalised per ``normalize``); NaN beyond each prompt's length."""
        return (self.restored - self.corrupt_metric[:, None, None]) * self.scale[:, None, None]

    def prompt(self, i: int) -> torch.Tensor:
        """``[lengths[i], L]`` effects of prompt i (rows: its tokens in order)."""
        return self.effects[i, : int(self.lengths[i])]

    def by_token_kind(self) -> tuple[tuple[str, ...], torch.Tensor]:
        """ROME's summary over prompts: ``(TOKEN_KINDS, [7, L])`` mean effect over the tokens of each kind
        (before the subject, its first / middle / last token, the first token after it, further tokens, the
        last token); a token may be of two kinds (a one-token subject is its first and last); NaN where no
        prompt has a token of that kind."""
        effects = self.effects
        L = effects.shape[-1]
        sums = torch.zeros(len(TOKEN_KINDS), L, dtype=effects.dtype)
        counts = torch.zeros(len(TOKEN_KINDS), dtype=effects.dtype)
        for i in range(effects.shape[0]):
            n, a, b = int(self.lengths[i]), int(self.subject_first[i]), int(self.subject_last[i])
            for t in range(n):
                kinds = [t < a, t == a, a < t < b, t == b, t == b + 1, b + 1 < t < n - 1, t == n - 1]
                for k, hit in enumerate(kinds):
                    if hit:
                        sums[k] += effects[i, t].cpu()
                        counts[k] += 1
        return TOKEN_KINDS, sums / counts[:, None]


def causal_trace_grid(
    model: Any,
    prompts: TokenizedPrompts | Batch,
    kind: str = "layer",
    window: int = 1,
    noise: str | float = "3sigma",
    samples: int = 1,
    seed: int = 0,
    metric: Metric | None = None,
    answer_ids: Any = None,
    subject_first: Any = None,
    subject_last: Any = None,
    normalize: str | None = None,
    embedding_std: float | None = None,
    max_rows: int = 1024,
    micro_batch: int | None = None,
    pad_id: int | None = None,
    padding_side: str = "right",
) -> CausalTraceGrid:
    """ROME's causal-tracing grid: for every prompt, real token t and layer l, the metric after restoring the
    clean ``kind`` activation (``layer`` hidden state, ``mlp`` or ``attn`` output) at t in the ``window``
    layers around l, in the run with noised subject embeddings.

    prompts, noise, samples, seed, metric, answer_ids, subject spans, embedding_std, pad_id, padding_side:
    as in ``causal_trace`` (the same noise for the same seed). normalize: None (default; effects are
    p_restored - p_corrupt, as ROME plots them) or "prompt" (divided by p_clean - p_corrupt). micro_batch:
    prompts per chunk (default: enough for about 8 restorations per forward of ``max_rows`` rows).
    Returns a ``CausalTraceGrid`` (``effects [B, T, L]``, ``prompt(i) -> [len_i, L]``).
    """
    if kind not in GRID_KINDS:
        raise ValueError(f"kind must be one of {GRID_KINDS} (the hidden state, MLP or attention output); got {kind!r}")
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive number of layers (1 = one layer; ROME uses 10 for mlp/attn); got {window!r}")
    if samples < 1:
        raise ValueError(f"samples must be >= 1; got {samples}")
    inp = prepare_trace(model, prompts, noise, metric, answer_ids, subject_first, subject_last, normalize, embedding_std, pad_id, padding_side)
    batch, metric, sdtype = inp.batch, inp.metric, inp.score_dtype
    B, L = batch.input_ids.shape[0], inp.table.n_layers
    lengths = batch.attention_mask.sum(1)
    T_max = int(lengths.max())
    restored = torch.zeros(B, T_max, L, dtype=sdtype, device=batch.input_ids.device)
    p_clean = torch.zeros(B, dtype=sdtype, device=batch.input_ids.device)
    p_corr = torch.zeros_like(p_clean)
    sites = resolve_sites(inp.table, [kind])
    step = micro_batch or max(1, max_rows // (8 * samples))
    if not metric.row_aware:
        step = B
    with frozen(inp.model), torch.no_grad():
        for rows in row_chunks(batch, step):
            grid, p_clean[rows], p_corr[rows] = _chunk_grid(inp, rows, sites, window, samples, seed, max_rows)
            restored[rows, : grid.shape[1]] = grid.to(sdtype)
    raise_if_not_finite(
        f"causal_trace_grid(kind={kind!r})", {"clean": p_clean, "noised": p_corr, "restored": restored},
        metrics_finite(p_clean, p_corr, restored),
    )
    beyond = torch.arange(T_max, device=lengths.device)[None, :] >= lengths[:, None]
    restored[beyond] = float("nan")
    _, scale = normalization_scale(p_clean, p_corr, metric.normalize)
    real = batch.attention_mask.bool().cpu()
    ids = [batch.input_ids[i].cpu()[real[i]].tolist() for i in range(B)]
    info = {"noise": noise, "noise_scale": inp.scale, "embedding_std": inp.embedding_std, "samples": samples, "seed": seed, "metric": metric.name}
    return CausalTraceGrid(
        kind, window, restored.cpu(), p_clean.cpu(), p_corr.cpu(), lengths.cpu(), inp.first, inp.last, ids, metric.normalize, scale.cpu(), info
    )


def _chunk_grid(
    inp: TraceInputs, rows: torch.Tensor, sites: list[Site], window: int, samples: int, seed: int, max_rows: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grid of one chunk of prompts: ``([n, T, L] restored metric, p_clean [n], p_corrupt [n])``."""
    model, table, metric = inp.model, inp.table, inp.metric
    sub = take_rows(inp.batch, rows)
    n = sub.input_ids.shape[0]
    device = sub.input_ids.device
    L = table.n_layers
    clean_acts, p_clean = capture_sites(model, sub, sites, metric, rows)
    noisy, noise = inp.noised(rows, samples, seed)
    R = noisy.input_ids.shape[0]  # samples · n rows per restoration
    lengths = sub.attention_mask.sum(1)
    first_col = sub.attention_mask.argmax(1)  # real tokens are contiguous (pad_batch), from this column
    T = int(lengths.max())
    prefix = _LayerInputs(model, table, noisy, lambda e: e + noise)
    first_rows = Batch(noisy.input_ids[:n], noisy.attention_mask[:n], noisy.position_ids[:n], noisy.last_pos[:n])

    def metric_of(logits: torch.Tensor, kc: int) -> torch.Tensor:
        blocks = [metric.values(logits[i : i + n], rows, first_rows) for i in range(0, kc * R, n)]
        return torch.cat(blocks).view(kc, samples, n).mean(1).double()  # [kc, n]

    p_corr = metric_of(prefix.logits(metric.vocab_ids), 1)[0]
    out = torch.empty(n, T, L, dtype=torch.float64, device=device)
    variants = [(t, l) for l in range(L) for t in range(T)]
    start = {l: window_layers(l, window, L).start for l in range(L)}
    per_chunk = max(1, max_rows // R)
    row_prompt = torch.arange(R, device=device) % n
    pos = 0
    while pos < len(variants):
        s0 = start[variants[pos][1]]
        chunk = [v for v in variants[pos : pos + per_chunk] if start[v[1]] == s0]
        pos += len(chunk)
        index = _restore_index(chunk, sites, window, L, R, row_prompt, lengths, first_col)

        def restore(site: Site, x: torch.Tensor) -> torch.Tensor | None:
            if site not in index:
                return None
            dst, src, col = index[site]
            x[dst, col] = clean_acts[site][src, col].to(x.dtype)
            return x

        with SiteHooks(model, list(index), restore):
            values = metric_of(prefix.run_suffix(s0, len(chunk), metric.vocab_ids), len(chunk))
        for j, (t, l) in enumerate(chunk):
            out[:, t, l] = values[j]
    return out, p_clean, p_corr


def _restore_index(
    chunk: list[tuple[int, int]], sites: list[Site], window: int, L: int, R: int, row_prompt: torch.Tensor,
    lengths: torch.Tensor, first_col: torch.Tensor,
) -> dict[Site, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per site: ``(dst rows, src rows, columns)`` ``[Q]`` of the restorations in ``chunk`` that touch it (rows
    of prompts shorter than t are left unpatched)."""
    site_of = {site.layer: site for site in sites}
    parts: dict[Site, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
    for j, (t, l) in enumerate(chunk):
        has_t = lengths[row_prompt] > t
        src = row_prompt[has_t]
        dst = j * R + torch.arange(R, device=row_prompt.device)[has_t]
        col = first_col[src] + t
        for m in window_layers(l, window, L):
            parts.setdefault(site_of[m], []).append((dst, src, col))
    return {site: tuple(torch.cat(p) for p in zip(*lists, strict=True)) for site, lists in parts.items()}
