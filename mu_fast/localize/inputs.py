"""Inputs shared by attribution, patching and causal tracing: clean/corrupt batches that align token by
token, frozen parameters, and logits read only at each prompt's answer position."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from mu_fast.data.base import Batch, TokenizedPrompts, pad_batch
from mu_fast.models.forward import head_logits, trunk_hidden

BatchLike = Batch | TokenizedPrompts | Sequence[Sequence[int]] | torch.Tensor


def default_pad_id(model: Any) -> int:
    config = getattr(model, "config", None)
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(config, name, None)
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


def as_batch(x: BatchLike, pad_id: int, side: str = "right", name: str = "input") -> Batch:
    """A ``Batch`` from a Batch, TokenizedPrompts, token-id lists, or an unpadded ``[B, T]`` id tensor.
    Raises ValueError for zero prompts or an empty prompt (naming its index)."""
    if isinstance(x, Batch):
        return x
    if isinstance(x, TokenizedPrompts):
        return _padded(x.input_ids, pad_id, side, name)
    if isinstance(x, torch.Tensor):
        if x.dim() != 2:
            raise ValueError(f"{name} as a tensor must be [B, T] token ids without padding; got shape {tuple(x.shape)}")
        return _padded(x.tolist(), pad_id, side, name)
    if isinstance(x, Sequence) and not isinstance(x, str) and all(isinstance(s, Sequence) and not isinstance(s, str) for s in x):
        return _padded([list(s) for s in x], pad_id, side, name)
    raise TypeError(f"{name} must be a Batch, TokenizedPrompts, a list of token-id lists or a [B, T] tensor; got {type(x).__name__}")


def _padded(seqs: Sequence[Sequence[int]], pad_id: int, side: str, name: str) -> Batch:
    if len(seqs) == 0:
        raise ValueError(f"{name}: no prompts given; pass at least one prompt (a list of token-id lists)")
    empty = [i for i, s in enumerate(seqs) if len(s) == 0]
    if empty:
        raise ValueError(f"{name}: prompt(s) {empty[:8]} have no tokens; drop empty prompts")
    return pad_batch(seqs, pad_id, side)


def aligned_pair(clean: BatchLike, corrupt: BatchLike, pad_id: int, side: str = "right") -> tuple[Batch, Batch]:
    """Clean and corrupt batches with identical shapes, attention masks and answer positions.

    Patching replaces activations position by position, so prompt i of both inputs must have the same
    length and padding; raises ValueError naming the first misaligned prompt otherwise.
    """
    a = as_batch(clean, pad_id, side, "clean")
    b = as_batch(corrupt, pad_id, side, "corrupt")
    na, nb = a.input_ids.shape[0], b.input_ids.shape[0]
    if na != nb:
        raise ValueError(
            f"clean has {na} prompts and corrupt has {nb}; pass one corrupt prompt per clean prompt, in the same order"
        )
    fix = "corrupt each prompt with a same-length corruption (e.g. mu_fast.localize.corrupt.replace_subject_tokens)"
    len_a, len_b = a.attention_mask.sum(1), b.attention_mask.sum(1)
    if a.attention_mask.shape == b.attention_mask.shape:
        bad = (a.attention_mask != b.attention_mask).any(1) | (a.last_pos != b.last_pos)
    else:
        bad = len_a != len_b
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        if int(len_a[i]) != int(len_b[i]):
            raise ValueError(f"prompt {i}: clean and corrupt have different lengths ({int(len_a[i])} vs {int(len_b[i])} tokens); {fix}")
        raise ValueError(
            f"prompt {i}: clean and corrupt have the same length ({int(len_a[i])} tokens) but different padding or answer "
            "positions; pad both with the same side and width (pass token-id lists and let attribute pad them)"
        )
    if a.input_ids.shape != b.input_ids.shape:
        raise ValueError(
            f"clean {tuple(a.input_ids.shape)} and corrupt {tuple(b.input_ids.shape)} batches are padded to different widths; "
            "pad both to the same width (pass token-id lists and let attribute pad them)"
        )
    return a, b


def model_device(model: Any) -> torch.device:
    return next(model.parameters()).device


def model_dtype(model: Any) -> torch.dtype:
    return model.get_input_embeddings().weight.dtype


def score_dtype(model: Any) -> torch.dtype:
    """float64 for fp64 models (exact checks), float32 otherwise."""
    return torch.float64 if model_dtype(model) == torch.float64 else torch.float32


@contextmanager
def frozen(model: Any) -> Iterator[None]:
    """Turn off weight gradients for the duration (restored after): attribution needs input gradients only,
    and frozen weights keep autograd from saving what weight gradients would need."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)


def last_logits(model: Any, batch: Batch, vocab_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Logits at each row's answer position (``batch.last_pos``): ``[B, V]`` or ``[B, len(vocab_ids)]``,
    in float32 (float64 for fp64 models). Gemma-2's final soft-capping is applied."""
    hidden = trunk_hidden(model, batch)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    ids = None if vocab_ids is None else vocab_ids.to(hidden.device)
    logits = head_logits(model, hidden[rows, batch.last_pos.to(hidden.device)], ids)
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def repeat_batch(batch: Batch, times: int) -> Batch:
    """``times`` copies of the batch stacked along rows (copy j holds rows j·B .. j·B + B - 1)."""
    return Batch(*(t.repeat(times, *([1] * (t.dim() - 1))) for t in (batch.input_ids, batch.attention_mask, batch.position_ids, batch.last_pos)))


def take_rows(batch: Batch, rows: torch.Tensor) -> Batch:
    """Rows ``rows`` of a batch, without the columns that are padding in every kept row (so short prompts
    are not run at the longest prompt's length). Either padding side; ``last_pos`` is shifted to match."""
    mask = batch.attention_mask[rows]
    used = mask.any(0).nonzero()
    c0, c1 = int(used[0]), int(used[-1]) + 1
    return Batch(
        batch.input_ids[rows, c0:c1].contiguous(), mask[:, c0:c1].contiguous(), batch.position_ids[rows, c0:c1].contiguous(), batch.last_pos[rows] - c0
    )


def row_chunks(batch: Batch, size: int, by_length: bool = True) -> list[torch.Tensor]:
    """Row indices in chunks of at most ``size``; sorted by prompt length first so each chunk pads little."""
    B = batch.input_ids.shape[0]
    lengths = batch.attention_mask.sum(1)
    size = max(1, int(size))
    if size >= B:
        return [torch.arange(B, device=lengths.device)]
    order = torch.argsort(lengths, stable=True) if by_length else torch.arange(B, device=lengths.device)
    return [order[i : i + size] for i in range(0, B, size)]
