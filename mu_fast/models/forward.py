"""Forward passes that compute logits only where they are read.

Vocabularies reach 256k tokens, so full logits at every position dominate memory. ``gathered_logits``
runs the decoder trunk once and applies the LM head (with Gemma-2's final soft-capping) only at the given
positions, and optionally only for a few vocabulary ids. ``lm_loss_backward`` computes next-token
cross-entropy over all real tokens chunk by chunk, so the full ``[B, T, V]`` logits never exist at once.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from mu_fast.data.base import Batch


def decoder_of(model: Any) -> torch.nn.Module:
    """The trunk of a CausalLM (``model.model`` for every supported architecture)."""
    prefix = getattr(model, "base_model_prefix", "model")
    trunk = getattr(model, prefix, None)
    if trunk is None:
        raise ValueError(f"{type(model).__name__} has no decoder trunk at .{prefix}; pass a HF *ForCausalLM model")
    return trunk


def final_softcap(model: Any) -> float | None:
    config = getattr(model, "config", None)
    return getattr(config, "final_logit_softcapping", None)


def head_logits(model: Any, hidden: torch.Tensor, vocab_ids: torch.Tensor | None = None) -> torch.Tensor:
    """LM-head logits of ``hidden [..., d]``: ``[..., V]``, or ``[..., len(vocab_ids)]`` for a vocab subset.
    Gemma-2's final tanh soft-capping is applied, so values equal the model's own logits."""
    head = model.get_output_embeddings()
    if vocab_ids is None:
        logits = head(hidden)
    else:
        weight = head.weight[vocab_ids]
        bias = None if getattr(head, "bias", None) is None else head.bias[vocab_ids]
        logits = F.linear(hidden, weight, bias)
    cap = final_softcap(model)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def trunk_hidden(model: Any, batch: Batch) -> torch.Tensor:
    """Final hidden states ``[B, T, d]`` (after the final norm) of the decoder trunk."""
    out = decoder_of(model)(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    )
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def gathered_logits(
    model: Any, batch: Batch, positions: torch.Tensor | None = None, vocab_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Logits at one position per row: ``[B, V]`` (or ``[B, len(vocab_ids)]``), float32 (float64 for fp64 models).

    positions: ``[B]`` int64, default ``batch.last_pos`` (the token that predicts the answer).
    """
    hidden = trunk_hidden(model, batch)
    pos = batch.last_pos if positions is None else positions
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return _at_least_fp32(head_logits(model, hidden[rows, pos.to(hidden.device)], vocab_ids))


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


LM_CHUNK_BYTES = 256 * 2**20  # fp32 logits of one LM-head chunk (256k vocabularies: 256 positions)


def lm_chunk_tokens(vocab_size: int, chunk_bytes: int = LM_CHUNK_BYTES) -> int:
    """Positions per LM-head chunk so that one chunk's fp32 logits take at most ``chunk_bytes``."""
    return int(min(8192, max(16, chunk_bytes // (4 * max(int(vocab_size), 1)))))


def lm_targets(batch: Batch, device: torch.device | str) -> torch.Tensor:
    """Next-token targets ``[B, T-1]`` int64, ``-100`` where the position or its target is padding."""
    inputs = batch.input_ids.to(device)
    mask = batch.attention_mask.to(device).bool()
    valid = mask[:, :-1] & mask[:, 1:]
    return torch.where(valid, inputs[:, 1:], torch.full_like(inputs[:, 1:], -100))


def lm_token_count(batch: Batch) -> int:
    """Number of next-token targets in ``batch`` (real positions followed by a real token)."""
    mask = batch.attention_mask.bool()
    return int((mask[:, :-1] & mask[:, 1:]).sum())


def lm_loss_backward_tensor(
    model: Any, batch: Batch, coef: float = 1.0, chunk_tokens: int | None = None, denominator: int | torch.Tensor | None = None
) -> torch.Tensor:
    """Backpropagate ``coef × Σ next-token CE / denominator`` over ``batch``'s real tokens; return the loss (a
    detached 0-d tensor; no host sync).

    denominator: the number of targets the mean runs over (default: this batch's own count; a micro-batched
    step passes the whole batch's count). The trunk runs once; the LM head and CE run over chunks of
    ``chunk_tokens`` positions (default ``lm_chunk_tokens(V)``: ≤ 256 MiB of fp32 logits) on a detached copy of the
    hidden states whose gradient then goes through the trunk in one backward, so no ``[tokens, V]`` fp32 tensor is
    ever whole. Padding positions are masked by ``ignore_index`` rather than removed (no data-dependent shapes).
    """
    hidden = trunk_hidden(model, batch)
    targets = lm_targets(batch, hidden.device).reshape(-1)
    if denominator is None:
        denominator = (targets != -100).sum().clamp(min=1)
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # [B*(T-1), d]: every position that predicts a next token
    n = h.shape[0]
    if n == 0:
        raise ValueError("the LM batch has no next-token targets (all sequences shorter than 2 tokens)")
    chunk = chunk_tokens or lm_chunk_tokens(model.get_output_embeddings().weight.shape[0])
    leaf = h.detach().requires_grad_(True)
    total = torch.zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
    for start in range(0, n, chunk):
        part = slice(start, start + chunk)
        logits = _at_least_fp32(head_logits(model, leaf[part]))
        loss = F.cross_entropy(logits, targets[part], reduction="sum", ignore_index=-100) / denominator
        (coef * loss).backward()
        total = total + loss.detach()
        del logits, loss
    if h.requires_grad:
        h.backward(leaf.grad)
    return total


def lm_loss_backward(model: Any, batch: Batch, coef: float = 1.0, chunk_tokens: int | None = None) -> float:
    """``lm_loss_backward_tensor`` over the whole batch, returning the mean loss as a float (one host sync)."""
    if lm_token_count(batch) == 0:
        raise ValueError("the LM batch has no next-token targets (all sequences shorter than 2 tokens)")
    return float(lm_loss_backward_tensor(model, batch, coef, chunk_tokens))


def lm_loss(model: Any, batch: Batch, chunk_tokens: int = 2048) -> float:
    """Mean next-token CE over real tokens without gradients (chunked)."""
    with torch.no_grad():
        hidden = trunk_hidden(model, batch)
        inputs = batch.input_ids.to(hidden.device)
        mask = batch.attention_mask.to(hidden.device).bool()
        valid = mask[:, :-1] & mask[:, 1:]
        h, targets = hidden[:, :-1][valid], inputs[:, 1:][valid]
        total = 0.0
        for start in range(0, int(targets.numel()), chunk_tokens):
            part = slice(start, start + chunk_tokens)
            total += float(F.cross_entropy(head_logits(model, h[part]).float(), targets[part], reduction="sum"))
        return total / max(int(targets.numel()), 1)
