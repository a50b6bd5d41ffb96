"""Corruptions used to localize facts (reference/authors_repo.md §2.2–2.3):

* ``replace_subject_tokens``: the subject's tokens replaced by random tokens, same count, seeded (the
  paper's AP corruption; clean and corrupt stay aligned token by token);
* ``subject_noise``: Gaussian noise on the subject's token embeddings, scale ``3σ`` (ROME) or ``sqrt(3σ)``
  (the paper's code), σ the std of subject-token embeddings (``subject_embedding_std``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from mu_fast.data.base import Batch, TokenizedPrompts

NOISE_RULES = ("3sigma", "sqrt3sigma", "sqrt3sigma_per_prompt")
PER_PROMPT_RULES = ("sqrt3sigma_per_prompt",)  # σ of each prompt's own subject tokens (the authors' CT)


def _spans(prompts: TokenizedPrompts | None, first: Any, last: Any, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    if first is None and prompts is not None:
        first, last = prompts.subject_first, prompts.subject_last
    if first is None or last is None:
        raise ValueError("subject positions are unknown: pass TokenizedPrompts built with subjects, or subject_first/subject_last")
    first, last = torch.as_tensor(first, dtype=torch.int64), torch.as_tensor(last, dtype=torch.int64)
    if first.shape != (n,) or last.shape != (n,):
        raise ValueError(f"subject_first/subject_last must be [{n}]; got {tuple(first.shape)} and {tuple(last.shape)}")
    if bool((last < first).any()):
        raise ValueError("subject_last < subject_first for some prompt; spans are inclusive token indices")
    return first, last


def replace_subject_tokens(
    prompts: TokenizedPrompts | Sequence[Sequence[int]],
    candidates: Any = None,
    vocab_size: int | None = None,
    seed: int = 0,
    subject_first: Any = None,
    subject_last: Any = None,
) -> list[list[int]]:
    """Token ids with each prompt's subject tokens (``subject_first..subject_last`` inclusive) replaced by
    tokens drawn uniformly from ``candidates`` (token ids, e.g. plain-word tokens) or from
    ``range(vocab_size)``; each replacement differs from the token it replaces. Deterministic for ``seed``."""
    ids = prompts.input_ids if isinstance(prompts, TokenizedPrompts) else [list(p) for p in prompts]
    tp = prompts if isinstance(prompts, TokenizedPrompts) else None
    first, last = _spans(tp, subject_first, subject_last, len(ids))
    if candidates is None:
        if vocab_size is None:
            raise ValueError("pass candidates= (token ids to draw from) or vocab_size=")
        pool = torch.arange(vocab_size)
    else:
        pool = torch.unique(torch.as_tensor(candidates, dtype=torch.int64).flatten())
    if pool.numel() < 2:
        raise ValueError(f"need at least 2 candidate tokens to draw replacements from; got {pool.numel()}")
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, seq in enumerate(ids):
        seq = list(seq)
        a, b = int(first[i]), int(last[i])
        if not 0 <= a <= b < len(seq):
            raise ValueError(f"prompt {i}: subject span {a}..{b} is outside its {len(seq)} tokens")
        for t in range(a, b + 1):
            new = seq[t]
            while new == seq[t]:
                new = int(pool[torch.randint(len(pool), (1,), generator=gen)])
            seq[t] = new
        out.append(seq)
    return out


def subject_mask(batch: Batch, first: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` bool: the subject's tokens in the padded batch (spans index real tokens, either padding side)."""
    pos = batch.position_ids
    first, last = first.to(pos.device)[:, None], last.to(pos.device)[:, None]
    return batch.attention_mask.bool() & (pos >= first) & (pos <= last)


def subject_embedding_std(embeddings: torch.Tensor, mask: torch.Tensor) -> float:
    """Std over all elements of the subject tokens' embeddings: ``embeddings [B, T, d]``, ``mask [B, T]``."""
    picked = embeddings[mask.to(embeddings.device)]
    if picked.numel() < 2:
        raise ValueError("no subject tokens selected; check the subject spans")
    return float(picked.double().std())


def noise_scale(noise: str | float, std: float) -> float:
    """``3sigma`` -> 3σ (ROME), ``sqrt3sigma`` / ``sqrt3sigma_per_prompt`` -> sqrt(3σ) (the paper's code; its σ is
    one prompt's), a number -> that scale."""
    if isinstance(noise, (int, float)) and not isinstance(noise, bool):
        return float(noise)
    if noise == "3sigma":
        return 3.0 * std
    if noise in ("sqrt3sigma", "sqrt3sigma_per_prompt"):
        return math.sqrt(3.0 * std)
    raise ValueError(f"noise must be one of {NOISE_RULES} or a number; got {noise!r}")


def subject_noise_rows(
    batch: Batch, first: torch.Tensor, last: torch.Tensor, d: int, scale: float, seeds: Sequence[int], dtype: torch.dtype, device: Any
) -> torch.Tensor:
    """Noise ``[R, T, d]`` for the R rows of a padded batch: row r's subject tokens (real-token indices
    ``first[r]..last[r]``) get Gaussian noise of std ``scale``, drawn on the CPU from ``seeds[r]`` in real-token
    coordinates (``randn(1, length_r, d)``, entry p for real token p), so a prompt's noise does not depend on
    the padding side or on which prompts share its batch. Zero elsewhere."""
    R, T = batch.input_ids.shape
    mask = batch.attention_mask.bool().cpu()
    out = torch.zeros(R, T, d, dtype=torch.float64)
    for r in range(R):
        cols = mask[r].nonzero().flatten()
        gen = torch.Generator().manual_seed(int(seeds[r]))
        z = torch.randn((1, len(cols), d), generator=gen, dtype=torch.float64)[0] * scale
        keep = torch.zeros(len(cols), dtype=torch.float64)
        keep[int(first[r]) : int(last[r]) + 1] = 1.0
        out[r, cols] = z * keep[:, None]
    return out.to(device=device, dtype=dtype)


def subject_noise(shape: tuple[int, int, int], mask: torch.Tensor, scale: float, seed: int, dtype: torch.dtype, device: Any) -> torch.Tensor:
    """Gaussian noise ``[R, T, d]`` of std ``scale`` at the ``mask [R, T]`` positions, zero elsewhere; drawn
    on the CPU from ``seed`` so it does not depend on the device."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    noise = noise * mask.cpu()[:, :, None]
    return noise.to(device=device, dtype=dtype)
