"""Checks on localization inputs (before any forward) and on metric values (after the runs), so that bad
token ids, answer positions, subject spans or non-finite metrics raise one clear error instead of an
IndexError deep in a forward or NaN scores."""

from __future__ import annotations

from typing import Any

import torch

from mu_fast.data.base import Batch

# How many offending prompt indices an error message lists.
_SHOWN = 8

NONFINITE_FIX = (
    "this usually comes from eager attention in float64/float16 with padded prompts (plain transformers gives "
    "NaN there too): load the model with attn_implementation='sdpa', run it in float32, or pass equal-length "
    "prompts (no padding)"
)


def _listed(indices: torch.Tensor) -> str:
    idx = indices.flatten().tolist()
    shown = ", ".join(str(i) for i in idx[:_SHOWN])
    return f"[{shown}{', ...' if len(idx) > _SHOWN else ''}]"


def vocab_size(model: Any) -> int:
    """Rows of the input embedding: token ids must lie in ``[0, vocab_size)``."""
    return int(model.get_input_embeddings().weight.shape[0])


def output_vocab_size(model: Any) -> int:
    """Rows of the LM head: answer ids must lie in ``[0, output_vocab_size)``."""
    head = model.get_output_embeddings()
    return int(head.weight.shape[0]) if head is not None else vocab_size(model)


def check_batch(batch: Batch, vocab: int, name: str) -> None:
    """Raise ValueError for a batch a forward cannot run correctly: no prompts, a prompt without real
    tokens, token ids outside ``[0, vocab)``, or an answer position (``last_pos``) outside the row or on
    padding. Called before any forward; costs one small reduction per check."""
    ids, mask, last = batch.input_ids, batch.attention_mask, batch.last_pos
    if ids.dim() != 2 or ids.shape[0] == 0:
        raise ValueError(f"{name}: no prompts given (input_ids shape {tuple(ids.shape)}); pass at least one prompt")
    B, T = ids.shape
    if mask.shape != ids.shape or last.shape != (B,):
        raise ValueError(
            f"{name}: attention_mask {tuple(mask.shape)} and last_pos {tuple(last.shape)} must be [{B}, {T}] and [{B}]; "
            "build the batch with mu_fast.data.base.pad_batch"
        )
    lengths = mask.sum(1)
    if bool((lengths == 0).any()):
        raise ValueError(f"{name}: prompt(s) {_listed((lengths == 0).nonzero())} have no real tokens; drop empty prompts")
    bad = (ids < 0) | (ids >= vocab)
    if bool(bad.any()):
        i, t = (int(x) for x in bad.nonzero()[0])
        where = "a padding position (check pad_id)" if not bool(mask[i, t]) else "a real token"
        raise ValueError(
            f"{name}: token id {int(ids[i, t])} at prompt {i}, position {t} ({where}) is outside the model's vocabulary "
            f"[0, {vocab}); tokenize with the model's own tokenizer"
        )
    out_of_row = (last < 0) | (last >= T)
    if bool(out_of_row.any()):
        i = int(out_of_row.nonzero()[0])
        raise ValueError(
            f"{name}: answer position last_pos[{i}] = {int(last[i])} is outside the row's {T} columns [0, {T}); "
            "last_pos indexes columns of the padded batch (pad_batch sets it to each prompt's last real token)"
        )
    on_pad = mask.gather(1, last[:, None])[:, 0] == 0
    if bool(on_pad.any()):
        i = int(on_pad.nonzero()[0])
        raise ValueError(
            f"{name}: answer position last_pos[{i}] = {int(last[i])} points at padding (attention_mask is 0 there); "
            "point it at a real token, e.g. the prompt's last one as pad_batch does"
        )


def check_subject_spans(batch: Batch, first: torch.Tensor, last: torch.Tensor) -> None:
    """Raise ValueError unless ``0 <= first[i] <= last[i] < length[i]`` for every prompt: the spans index
    real tokens (inclusive), so a span past the prompt would silently noise fewer tokens."""
    B = batch.input_ids.shape[0]
    if first.shape != (B,) or last.shape != (B,):
        raise ValueError(
            f"subject_first / subject_last must be [{B}] (one inclusive token span per prompt); "
            f"got shapes {tuple(first.shape)} and {tuple(last.shape)}"
        )
    lengths = batch.attention_mask.sum(1).cpu()
    first, last = first.cpu(), last.cpu()
    bad = (first < 0) | (last < first) | (last >= lengths)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        a, b, n = int(first[i]), int(last[i]), int(lengths[i])
        why = "is empty (subject_last < subject_first)" if b < a else f"is outside the prompt's {n} real tokens"
        raise ValueError(
            f"prompt {i}: subject span {a}..{b} {why}; spans are inclusive real-token indices with "
            f"0 <= subject_first <= subject_last < {n} (count tokens from the prompt's first real token, not the padding)"
        )


def metrics_finite(*values: torch.Tensor) -> torch.Tensor:
    """A 0-dim bool tensor: every value finite (no host sync; pass it to ``raise_if_not_finite``)."""
    return torch.stack([torch.isfinite(v).all() for v in values]).all()


def raise_if_not_finite(where: str, runs: dict[str, torch.Tensor], ok: torch.Tensor | None = None) -> None:
    """Raise RuntimeError when any ``[B]`` metric value in ``runs`` ({run name: values}) is NaN or inf,
    naming the run, the count and the prompt indices, and the fix. One host sync when all are finite."""
    if ok is None:
        ok = metrics_finite(*runs.values())
    if bool(ok):
        return
    parts = []
    for run, values in runs.items():
        bad = ~torch.isfinite(values.reshape(values.shape[0], -1)).all(1) if values.dim() else ~torch.isfinite(values)[None]
        if bool(bad.any()):
            parts.append(f"the {run} run's metric is NaN/inf for {int(bad.sum())} of {bad.numel()} prompts (indices {_listed(bad.nonzero())})")
    detail = "; ".join(parts) or "a metric value is NaN/inf"
    raise RuntimeError(f"{where}: {detail}, so the scores would be NaN; {NONFINITE_FIX}")
