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
    """Logits at one position per row: ``[B, V]`` (or ``[B, len(vocab_ids)]``), float32.

    positions: ``[B]`` int64, default ``batch.last_pos`` (the token that predicts the answer).
    """
    hidden = trunk_hidden(model, batch)
    pos = batch.last_pos if positions is None else positions
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return head_logits(model, hidden[rows, pos.to(hidden.device)], vocab_ids).float()


def lm_loss_backward(model: Any, batch: Batch, coef: float = 1.0, chunk_tokens: int = 2048) -> float:
    """Backpropagate ``coef ×`` mean next-token CE over real tokens; return the loss value.

    The trunk runs once; the LM head and CE run over chunks of ``chunk_tokens`` positions on a detached copy
    of the hidden states whose gradient is then pushed through the trunk in one backward.
    """
    hidden = trunk_hidden(model, batch)
    inputs = batch.input_ids.to(hidden.device)
    mask = batch.attention_mask.to(hidden.device).bool()
    valid = mask[:, :-1] & mask[:, 1:]
    h = hidden[:, :-1][valid]  # [N, d] positions that predict a real next token
    targets = inputs[:, 1:][valid]
    n = int(targets.numel())
    if n == 0:
        raise ValueError("the LM batch has no next-token targets (all sequences shorter than 2 tokens)")
    leaf = h.detach().requires_grad_(True)
    total = 0.0
    for start in range(0, n, chunk_tokens):
        part = slice(start, start + chunk_tokens)
        logits = head_logits(model, leaf[part]).float()
        loss = F.cross_entropy(logits, targets[part], reduction="sum") / n
        (coef * loss).backward()
        total += float(loss.detach())
    if h.requires_grad:
        h.backward(leaf.grad)
    return total


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
