"""Metrics read from the logits at each prompt's answer position only (never full-vocabulary logits at
every position): logit difference, probability and log-probability of the answer, or any row-wise callable.

A metric returns one value per prompt. Attribution differentiates the *sum* of the per-prompt values (rows
do not interact, so each row's gradient is that prompt's own) and then normalises:

* ``normalize="mean"``: ``(m - mean(m_corrupt)) / (mean(m_clean) - mean(m_corrupt))``, so the batch-mean
  metric is 1 on the clean and 0 on the corrupt input (TransformerLens demo, the paper's AP);
* ``normalize="prompt"``: the same with each prompt's own clean and corrupt values (the paper's CT);
* ``normalize=None``: raw values.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from typing import Any

import torch

from mu_fast.data.base import Batch

NORMALIZATIONS = ("mean", "prompt", None)


class Metric:
    """Base class: ``values(logits [n, V_sub], rows [n], batch) -> [n]`` where ``rows`` index the prompts of
    the call and ``logits`` hold the columns ``vocab_ids`` (None: the whole vocabulary)."""

    name = "metric"
    vocab_ids: torch.Tensor | None = None
    # False for callables that cannot be told which prompt a row is: they run unchunked, in order.
    row_aware = True

    def __init__(self, normalize: str | None):
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}; got {normalize!r}")
        self.normalize = normalize

    def values(self, logits: torch.Tensor, rows: torch.Tensor, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def check(self, n_prompts: int, vocab_size: int | None = None) -> None:
        """Raise ValueError when per-prompt ids do not cover ``n_prompts`` prompts, or when a token id the
        metric reads lies outside ``[0, vocab_size)`` (the LM head's rows)."""
        if vocab_size is not None and self.vocab_ids is not None:
            _check_vocab(self.vocab_ids, vocab_size, f"{self.name}: vocab_ids")

    def __call__(self, logits: torch.Tensor, rows: torch.Tensor | None = None, batch: Batch | None = None) -> torch.Tensor:
        """Per-prompt values from full-vocabulary answer-position logits ``[n, V]`` (rows default 0..n-1)."""
        rows = torch.arange(logits.shape[0], device=logits.device) if rows is None else rows
        sub = logits if self.vocab_ids is None else logits[:, self.vocab_ids.to(logits.device)]
        return self.values(sub, rows, batch)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return f"{self.name}(normalize={self.normalize!r})"


def _ids(x: Any, what: str) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=torch.int64)
    if t.dim() not in (1, 2):
        raise ValueError(f"{what} must be [B] or [B, k] token ids; got shape {tuple(t.shape)}")
    return t


def _check_vocab(ids: torch.Tensor, vocab_size: int, what: str) -> None:
    bad = (ids < 0) | (ids >= vocab_size)
    if bool(bad.any()):
        where = tuple(int(x) for x in bad.nonzero()[0])
        at = f"[{where[0]}]" if len(where) == 1 else f"[{where[0]}, {where[1]}]"
        raise ValueError(
            f"{what}{at} = {int(ids[where])} is outside the model's vocabulary [0, {vocab_size}); "
            "use token ids of the model's own tokenizer (e.g. mu_fast.data.base.answer_token_id)"
        )


class _AnswerMetric(Metric):
    """Shared plumbing: per-prompt token ids mapped onto the columns of a vocabulary subset."""

    def __init__(self, normalize: str | None, *id_sets: torch.Tensor, choices: Any = None):
        super().__init__(normalize)
        self.choices = None if choices is None else _ids(choices, "choices").flatten()
        pieces = [t.flatten() for t in id_sets] + ([self.choices] if self.choices is not None else [])
        needs_full = self.choices is None and self.full_vocab
        self.vocab_ids = None if needs_full else torch.unique(torch.cat(pieces))

    full_vocab = False

    def _cols(self, ids: torch.Tensor, rows: torch.Tensor, device: torch.device) -> torch.Tensor:
        picked = ids.to(device)[rows.to(device)]
        if self.vocab_ids is None:
            return picked
        return torch.searchsorted(self.vocab_ids.to(device), picked)

    def _check_len(self, t: torch.Tensor, n: int, what: str) -> None:
        if t.shape[0] != n:
            raise ValueError(f"{self.name}: {what} has {t.shape[0]} entries for {n} prompts; pass one per prompt")


class LogitDiff(_AnswerMetric):
    """``logit[correct] - mean_k logit[incorrect_k]`` (the paper's sports AP uses the mean of the wrong sports)."""

    name = "logit_diff"

    def __init__(self, correct: Any, incorrect: Any, normalize: str | None = "mean"):
        self.correct, self.incorrect = _ids(correct, "correct"), _ids(incorrect, "incorrect")
        if self.correct.dim() != 1:
            raise ValueError(f"correct must be [B] token ids; got shape {tuple(self.correct.shape)}")
        super().__init__(normalize, self.correct, self.incorrect)

    def check(self, n_prompts: int, vocab_size: int | None = None) -> None:
        self._check_len(self.correct, n_prompts, "correct")
        self._check_len(self.incorrect, n_prompts, "incorrect")
        if vocab_size is not None:
            _check_vocab(self.correct, vocab_size, f"{self.name}: correct")
            _check_vocab(self.incorrect, vocab_size, f"{self.name}: incorrect")

    def values(self, logits: torch.Tensor, rows: torch.Tensor, batch: Batch) -> torch.Tensor:
        good = logits.gather(1, self._cols(self.correct, rows, logits.device)[:, None])[:, 0]
        bad_cols = self._cols(self.incorrect, rows, logits.device)
        bad = logits.gather(1, bad_cols.view(len(rows), -1)).mean(1)
        return good - bad


class LogProb(_AnswerMetric):
    """``log softmax(logits)[answer]`` over the full vocabulary, or over ``choices`` when given."""

    name = "logprob"
    full_vocab = True

    def __init__(self, answer: Any, choices: Any = None, normalize: str | None = None):
        self.answer = _ids(answer, "answer")
        if self.answer.dim() != 1:
            raise ValueError(f"answer must be [B] token ids; got shape {tuple(self.answer.shape)}")
        super().__init__(normalize, self.answer, choices=choices)
        if self.choices is not None and not bool(torch.isin(self.answer, self.choices).all()):
            raise ValueError(f"{self.name}: some answer ids are not among choices {self.choices.tolist()}")

    def check(self, n_prompts: int, vocab_size: int | None = None) -> None:
        self._check_len(self.answer, n_prompts, "answer")
        if vocab_size is not None:
            _check_vocab(self.answer, vocab_size, f"{self.name}: answer")
            if self.choices is not None:
                _check_vocab(self.choices, vocab_size, f"{self.name}: choices")

    def _logprob(self, logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        # With choices, vocab_ids are exactly the sorted choices, so the softmax runs over them alone.
        cols = self._cols(self.answer, rows, logits.device)
        return torch.log_softmax(logits, dim=-1).gather(1, cols[:, None])[:, 0]

    def values(self, logits: torch.Tensor, rows: torch.Tensor, batch: Batch) -> torch.Tensor:
        return self._logprob(logits, rows)


class Prob(LogProb):
    """``softmax(logits)[answer]`` over the full vocabulary, or over ``choices`` (the paper's sports accuracy)."""

    name = "prob"

    def values(self, logits: torch.Tensor, rows: torch.Tensor, batch: Batch) -> torch.Tensor:
        return self._logprob(logits, rows).exp()


class CallableMetric(Metric):
    """Wraps a row-wise callable (row i of its output depends only on row i of the logits and the batch).

    ``fn(last_logits [n, V_sub], batch, rows [n]) -> [n]`` receives the prompt index of each row (prompts may
    be regrouped, sorted by length or repeated). A two-argument ``fn(last_logits, batch)`` is called only
    with all prompts in their original order, so callers run it without micro-batching.
    """

    def __init__(self, fn: Callable[..., torch.Tensor], normalize: str | None = None, vocab_ids: Any = None):
        super().__init__(normalize)
        self.fn = fn
        self.name = getattr(fn, "__name__", "callable")
        self.vocab_ids = None if vocab_ids is None else torch.unique(_ids(vocab_ids, "vocab_ids").flatten())
        try:
            n_params = len(inspect.signature(fn).parameters)
        except (TypeError, ValueError):
            n_params = 2
        self.row_aware = n_params >= 3

    def values(self, logits: torch.Tensor, rows: torch.Tensor, batch: Batch) -> torch.Tensor:
        if self.row_aware:
            out = self.fn(logits, batch, rows)
        else:
            if not torch.equal(rows.cpu(), torch.arange(len(rows))):
                raise ValueError(
                    f"metric {self.name!r} takes (logits, batch) and so must see all prompts in order; give it a third "
                    "argument `rows` (prompt index of each row) to allow micro-batching and repeated rows"
                )
            out = self.fn(logits, batch)
        if not isinstance(out, torch.Tensor) or out.shape != (logits.shape[0],):
            raise ValueError(f"metric {self.name!r} must return a [{logits.shape[0]}] tensor; got {getattr(out, 'shape', type(out))}")
        return out


def logit_diff(correct: Any, incorrect: Any, normalize: str | None = "mean") -> LogitDiff:
    """Logit difference metric; correct ``[B]``, incorrect ``[B]`` or ``[B, k]`` (mean over k)."""
    return LogitDiff(correct, incorrect, normalize)


def prob(answer: Any, choices: Any = None, normalize: str | None = None) -> Prob:
    """Probability of ``answer [B]`` (softmax over the vocabulary or over ``choices``)."""
    return Prob(answer, choices, normalize)


def logprob(answer: Any, choices: Any = None, normalize: str | None = None) -> LogProb:
    """Log-probability of ``answer [B]`` (log-softmax over the vocabulary or over ``choices``)."""
    return LogProb(answer, choices, normalize)


def as_metric(metric: Metric | Callable[..., torch.Tensor]) -> Metric:
    if isinstance(metric, Metric):
        return metric
    if callable(metric):
        return CallableMetric(metric)
    raise TypeError(f"metric must be a Metric (logit_diff/prob/logprob) or a callable (logits, batch) -> [B]; got {type(metric).__name__}")


def normalization_scale(
    clean: torch.Tensor, corrupt: torch.Tensor, normalize: str | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-prompt ``(offset, scale)`` so that ``(m - offset) * scale`` is the normalised metric.

    clean, corrupt: ``[B]`` raw metric values. Prompts whose clean and corrupt values coincide get
    scale 0 under ``normalize="prompt"`` (with a warning); under ``"mean"`` equal means raise ValueError.
    """
    if normalize is None:
        return torch.zeros_like(clean), torch.ones_like(clean)
    if normalize == "mean":
        gap = clean.mean() - corrupt.mean()
        if float(gap.abs()) <= 1e-12 * max(1.0, float(clean.abs().mean())):
            raise ValueError(
                f"clean and corrupt metric means are equal ({float(clean.mean()):.6g}); the normalised metric is "
                "undefined. Use a corruption that changes the answer, or normalize=None"
            )
        return corrupt.mean().expand_as(clean).clone(), (1.0 / gap).expand_as(clean).clone()
    gap = clean - corrupt
    degenerate = gap.abs() <= 1e-12
    if bool(degenerate.any()):
        warnings.warn(f"{int(degenerate.sum())} prompt(s) have equal clean and corrupt metric; their normalised scores are set to 0", stacklevel=3)
    scale = torch.where(degenerate, torch.zeros_like(gap), 1.0 / torch.where(degenerate, torch.ones_like(gap), gap))
    return corrupt.clone(), scale
