"""Per-prompt scores and set accuracies: the paper's continuous metric and argmax accuracy.

The paper's accuracy (authors_repo.md §4.1) is *continuous*: the mean probability of the label token,
normalised over a small choice set when the format has one (the 4 sports tokens, or " A".." D" for MCQ) and
over the full vocabulary otherwise (CounterFact). Argmax accuracy is reported beside it. Only the logits of
each prompt's last real token are computed (``gathered_logits``): one ``[B, V]`` row block per batch, never
``[B, T, V]``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from mu_fast.data.base import Batch, TokenizedPrompts, pad_batch
from mu_fast.models.forward import gathered_logits

if TYPE_CHECKING:
    from mu_fast.edit.batched import BatchedDeltas


@dataclass
class PromptScores:
    """Per-prompt scores of one TokenizedPrompts, all ``[N]`` tensors on the CPU.

    Scores are float32 (float64 for a float64 model). p_true: probability of the true label token (softmax over ``choice_ids`` when the set has
    choices, else over the full vocabulary). p_edit: the same for the edit label, or None without
    edit answers. argmax_true / argmax_edit: bool, the label token is the argmax over the choices (or the
    full vocabulary). logprob_true: full-vocabulary log-probability of the true label token (minus
    the cross-entropy the training losses use), whatever the choice set. fact_ids: int64 or None, which
    fact each prompt belongs to (paraphrases give several prompts per fact).

    When the set has choices but the edit answers are not all among them, the edit scores fall back to the
    full vocabulary (``edit_over_choices`` is False then).
    """

    p_true: torch.Tensor
    p_edit: torch.Tensor | None
    argmax_true: torch.Tensor
    argmax_edit: torch.Tensor | None
    logprob_true: torch.Tensor
    fact_ids: torch.Tensor | None = None
    edit_over_choices: bool = False

    def __len__(self) -> int:
        return int(self.p_true.numel())


def model_device(model: Any) -> torch.device:
    """The device of the model's first parameter (where its inputs must go)."""
    try:
        return next(model.parameters()).device
    except StopIteration as err:
        raise ValueError(f"{type(model).__name__} has no parameters; pass a HF *ForCausalLM model") from err


def vocab_size_of(model: Any) -> int:
    """Rows of the LM head: the number of token ids the model can read and predict."""
    return int(model.get_output_embeddings().weight.shape[0])


def check_token_ids(model: Any, tokenized: TokenizedPrompts, what: str = "prompts") -> None:
    """Raise ValueError when any prompt, label or choice id is outside the model's vocabulary (a tokenizer
    from another model)."""
    vocab = vocab_size_of(model)
    largest = max((max(ids) for ids in tokenized.input_ids if ids), default=-1)
    labels = [t for t in (tokenized.answer_ids, tokenized.edit_ids, tokenized.choice_ids) if t is not None]
    largest = max([largest] + [int(t.max()) for t in labels if t.numel()])
    if largest >= vocab:
        raise ValueError(
            f"the {what} {tokenized.source.name!r} contain token id {largest} but the model's vocabulary has {vocab} "
            "entries; tokenize with the tokenizer that belongs to this model"
        )


class eval_mode:
    """Context manager: the model in eval mode without gradients; the previous training flag is restored."""

    def __init__(self, model: Any):
        self.model = model

    def __enter__(self) -> Any:
        self.was_training = bool(self.model.training)
        self.model.eval()
        self.no_grad = torch.no_grad()
        self.no_grad.__enter__()
        return self.model

    def __exit__(self, *exc: Any) -> None:
        self.no_grad.__exit__(*exc)
        self.model.train(self.was_training)


def length_sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Index batches of at most ``batch_size`` prompts of similar length (less padding)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


class _ScoreBuffers:
    """The ``[N]`` CPU tensors one PromptScores is filled into, batch by batch (``_score_batch``)."""

    def __init__(self, tokenized: TokenizedPrompts, wide: torch.dtype):
        n = len(tokenized)
        has_edit = tokenized.edit_ids is not None
        self.p_true = torch.empty(n, dtype=wide)
        self.logprob_true = torch.empty(n, dtype=wide)
        self.argmax_true = torch.empty(n, dtype=torch.bool)
        self.p_edit = torch.empty(n, dtype=wide) if has_edit else None
        self.argmax_edit = torch.empty(n, dtype=torch.bool) if has_edit else None

    def scores(self, tokenized: TokenizedPrompts) -> PromptScores:
        fact_ids = tokenized.source.fact_ids
        return PromptScores(
            p_true=self.p_true,
            p_edit=self.p_edit,
            argmax_true=self.argmax_true,
            argmax_edit=self.argmax_edit,
            logprob_true=self.logprob_true,
            fact_ids=None if fact_ids is None else torch.as_tensor(list(fact_ids), dtype=torch.int64),
            edit_over_choices=tokenized.choice_ids is not None and tokenized.edit_choice is not None,
        )


def _score_batch(out: _ScoreBuffers, tokenized: TokenizedPrompts, rows: torch.Tensor, logits: torch.Tensor) -> None:
    """Score the prompts ``rows`` (``[B]`` int64, CPU) from their last-token ``logits`` (``[B, V]``) into ``out``."""
    device = logits.device
    choices = tokenized.choice_ids
    logp = torch.log_softmax(logits, dim=-1)
    true_ids = tokenized.answer_ids[rows].to(device)
    out.logprob_true[rows] = logp.gather(1, true_ids[:, None])[:, 0].cpu()
    if choices is not None:
        probs = torch.softmax(logits[:, choices.to(device)], dim=-1)  # [B, C]
        picked = probs.argmax(dim=-1)
        true_c = tokenized.answer_choice[rows].to(device)
        out.p_true[rows] = probs.gather(1, true_c[:, None])[:, 0].cpu()
        out.argmax_true[rows] = (picked == true_c).cpu()
    else:
        out.p_true[rows] = logp.gather(1, true_ids[:, None])[:, 0].exp().cpu()
        out.argmax_true[rows] = (logits.argmax(dim=-1) == true_ids).cpu()
    if out.p_edit is not None:
        if choices is not None and tokenized.edit_choice is not None:
            edit_c = tokenized.edit_choice[rows].to(device)
            out.p_edit[rows] = probs.gather(1, edit_c[:, None])[:, 0].cpu()
            out.argmax_edit[rows] = (picked == edit_c).cpu()
        else:
            edit_ids = tokenized.edit_ids[rows].to(device)
            out.p_edit[rows] = logp.gather(1, edit_ids[:, None])[:, 0].exp().cpu()
            out.argmax_edit[rows] = (logits.argmax(dim=-1) == edit_ids).cpu()


def _check_scorable(model: Any, tokenized: TokenizedPrompts) -> None:
    if len(tokenized) == 0:
        raise ValueError(f"the prompt set {tokenized.source.name!r} is empty; there is nothing to score")
    check_token_ids(model, tokenized)


def _wide_dtype(model: Any) -> torch.dtype:
    return torch.promote_types(next(model.parameters()).dtype, torch.float32)  # float64 scores for float64 models


def prompt_scores(model: Any, tokenized: TokenizedPrompts, batch_size: int = 64) -> PromptScores:
    """Score every prompt of ``tokenized`` at its last token (no gradients, eval mode, the model's own
    device and dtype; right padding with position ids, so scores do not depend on the batching).

    Returns PromptScores with ``[N]`` tensors in prompt order (see its docstring for the definitions).
    """
    _check_scorable(model, tokenized)
    device = model_device(model)
    pad_id = int(getattr(model.config, "pad_token_id", None) or 0)
    out = _ScoreBuffers(tokenized, _wide_dtype(model))
    with eval_mode(model):
        for idx in length_sorted_batches([len(s) for s in tokenized.input_ids], batch_size):
            rows = torch.tensor(idx, dtype=torch.int64)
            batch = pad_batch([tokenized.input_ids[i] for i in idx], pad_id, side="right").to(device)
            _score_batch(out, tokenized, rows, gathered_logits(model, batch))  # [B, V] float32 or float64
    return out.scores(tokenized)


def variant_prompts_per_batch(batch_size: int, variants: int) -> int:
    """Prompts per forward when ``variants`` configurations are scored together: ``max(1, batch_size // variants)``,
    so one forward holds at most ``max(batch_size, variants)`` rows (the single-model batch's memory)."""
    if batch_size < 1 or variants < 1:
        raise ValueError(f"batch_size and variants must be >= 1; got {batch_size} and {variants}")
    return max(1, batch_size // variants)


def repeat_batch(batch: Batch, times: int) -> Batch:
    """``batch`` stacked ``times`` times along rows (group-major: copy 0's rows first): ``[times·B, T]``."""
    return Batch(*(t.repeat(times, *([1] * (t.dim() - 1))) for t in
                   (batch.input_ids, batch.attention_mask, batch.position_ids, batch.last_pos)))


@contextlib.contextmanager
def attached(deltas: BatchedDeltas) -> Iterator[None]:
    """``deltas``' batched forwards routed through the model's masked modules inside (``deltas.attach()``), and
    taken off after unless they were attached before (``edit_batched`` detaches them when it returns)."""
    was_attached = bool(deltas._hooks)
    deltas.attach()
    try:
        yield
    finally:
        if not was_attached:
            deltas.detach()


def prompt_scores_variants(model: Any, tokenized: TokenizedPrompts, deltas: BatchedDeltas,
                           batch_size: int = 64) -> list[PromptScores]:
    """``prompt_scores`` of the model edited by each of ``deltas``' K configurations, in one forward per batch.

    deltas: a ``mu_fast.edit.batched.BatchedDeltas`` over ``model`` (none of its configurations applied). Each
    length-sorted batch of ``variant_prompts_per_batch(batch_size, K)`` prompts is repeated K times (group-major
    rows: configuration 0's copy first) and run once inside ``deltas.groups``, every masked linear adding
    configuration k's delta to its copy; the logits are split back and scored as ``prompt_scores`` scores them.
    Returns K PromptScores; element k equals ``prompt_scores`` under ``deltas.variant(k)`` up to float summation
    order (x·W0 + x·D instead of x·(W0 + D); ~1e-16 in fp64), argmax fields aside from exact ties.
    """
    _check_scorable(model, tokenized)
    if deltas.model is not model:
        raise ValueError("deltas were built over another model; pass the model the BatchedDeltas edit")
    k_count = len(deltas)
    device = model_device(model)
    pad_id = int(getattr(model.config, "pad_token_id", None) or 0)
    outs = [_ScoreBuffers(tokenized, _wide_dtype(model)) for _ in range(k_count)]
    delta = deltas.values - deltas.base
    per_batch = variant_prompts_per_batch(batch_size, k_count)
    with eval_mode(model), attached(deltas):
        for idx in length_sorted_batches([len(s) for s in tokenized.input_ids], per_batch):
            rows = torch.tensor(idx, dtype=torch.int64)
            batch = repeat_batch(pad_batch([tokenized.input_ids[i] for i in idx], pad_id, side="right"), k_count)
            batch = batch.to(device)
            b = len(idx)
            with deltas.groups([(k, k * b, (k + 1) * b) for k in range(k_count)], delta):
                logits = gathered_logits(model, batch)  # [K*B, V]
            for out, part in zip(outs, logits.split(b), strict=True):
                _score_batch(out, tokenized, rows, part)
    return [out.scores(tokenized) for out in outs]


def set_accuracy(scores: PromptScores) -> dict[str, float | int | None]:
    """Mean accuracies over the prompts of one set.

    Returns ``acc`` (mean p_true: the paper's continuous accuracy), ``argmax_acc``, ``edit_acc`` (mean
    p_edit) and ``edit_argmax_acc`` (None without edit answers), ``ce`` (mean full-vocabulary cross-entropy
    of the true label, nats) and ``n`` (number of prompts). Paraphrase sets average over prompts, as the
    paper does.
    """
    n = len(scores)
    if n == 0:
        raise ValueError("cannot average the scores of an empty prompt set")
    return {
        "acc": float(scores.p_true.double().mean()),
        "argmax_acc": float(scores.argmax_true.double().mean()),
        "edit_acc": None if scores.p_edit is None else float(scores.p_edit.double().mean()),
        "edit_argmax_acc": None if scores.argmax_edit is None else float(scores.argmax_edit.double().mean()),
        "ce": float(-scores.logprob_true.double().mean()),
        "n": n,
    }
