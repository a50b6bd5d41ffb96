"""Forget / maintain accuracies of a FactTask in the training format and every other format it carries.

"normal" is the training format (``task.forget_test`` / ``task.maintain_test``, the in-loop eval of
authors_repo.md §4.2); every key of ``task.formats`` (qa, mcq, paraphrase, neighborhood, ...) is scored on
each of its prompt sets (usually "forget" and "maintain"). Every PromptSet is tokenized once per tokenizer
and the result is cached on the task, so repeated evaluations (the steps of an edit) never re-tokenize.
"""

from __future__ import annotations

from typing import Any

from mu_fast.data.base import FactTask, PromptSet, TokenizedPrompts, tokenize_prompts
from mu_fast.evaluate.metrics import PromptScores, prompt_scores, prompt_scores_variants, set_accuracy

NORMAL = "normal"
_CACHE_ATTR = "_mu_fast_tokenized"


def task_prompt_sets(
    task: FactTask, formats: list[str] | tuple[str, ...] | None = None
) -> dict[tuple[str, str], PromptSet]:
    """The prompt sets an evaluation reads: ``{(format, split): PromptSet}``.

    ``formats`` None means "normal" plus every key of ``task.formats``. "normal" always maps to the training
    format sets ``task.forget_test`` / ``task.maintain_test`` (a ``task.formats["normal"]`` entry holds the
    same facts and is not scored twice).
    """
    available = [NORMAL] + [f for f in task.formats if f != NORMAL]
    chosen = available if formats is None else list(formats)
    unknown = [f for f in chosen if f not in available]
    if unknown:
        raise ValueError(f"formats {unknown} are not in task {task.name!r}; it has {available}")
    sets: dict[tuple[str, str], PromptSet] = {}
    for fmt in chosen:
        if fmt == NORMAL:
            sets[(NORMAL, "forget")] = task.forget_test
            sets[(NORMAL, "maintain")] = task.maintain_test
            continue
        for split, prompt_set in task.formats[fmt].items():
            sets[(fmt, split)] = prompt_set
    return sets


def tokenized_set(tokenizer: Any, task: FactTask, prompt_set: PromptSet) -> TokenizedPrompts:
    """``tokenize_prompts(tokenizer, prompt_set)``, cached on ``task`` per (tokenizer, prompt set) object."""
    cache: dict[tuple[int, int], tuple[Any, PromptSet, TokenizedPrompts]] = task.__dict__.setdefault(_CACHE_ATTR, {})
    key = (id(tokenizer), id(prompt_set))
    hit = cache.get(key)
    # The entry keeps the tokenizer and the set alive, so their ids cannot be reused by other objects.
    if hit is not None and hit[0] is tokenizer and hit[1] is prompt_set:
        return hit[2]
    if len(prompt_set) == 0:
        raise ValueError(
            f"task {task.name!r}: the prompt set {prompt_set.name!r} is empty; drop it or choose a split with facts"
        )
    tokenized = tokenize_prompts(tokenizer, prompt_set)
    cache[key] = (tokenizer, prompt_set, tokenized)
    return tokenized


def tokenize_task(
    tokenizer: Any, task: FactTask, formats: list[str] | tuple[str, ...] | None = None
) -> dict[tuple[str, str], TokenizedPrompts]:
    """Tokenize (once, cached on the task) every prompt set ``evaluate_task`` reads: ``{(format, split): ...}``."""
    return {key: tokenized_set(tokenizer, task, ps) for key, ps in task_prompt_sets(task, formats).items()}


def evaluate_task(
    model: Any,
    tokenizer: Any,
    task: FactTask,
    formats: list[str] | tuple[str, ...] | None = None,
    batch_size: int = 64,
    progress: bool = False,
    tokenized: dict[tuple[str, str], TokenizedPrompts] | None = None,
) -> dict[str, dict[str, dict[str, float | int | None]]]:
    """Forget and maintain accuracies in every format: ``{format: {split: set_accuracy(...)}}``.

    Each leaf holds ``acc`` (continuous, true label), ``argmax_acc``, ``edit_acc``, ``edit_argmax_acc``,
    ``ce`` and ``n`` (see ``set_accuracy``). Neighborhood sets also hold ``edit_error`` (= edit_acc: how
    much the edit leaks into neighbouring facts). ``tokenized`` may pass precomputed tokenizations keyed
    ``(format, split)``; missing ones are tokenized once and cached on the task.
    """
    sets = task_prompt_sets(task, formats)
    items = list(sets.items())
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc=f"evaluate {task.name}", leave=False)
    results: dict[str, dict[str, dict[str, float | int | None]]] = {}
    for (fmt, split), prompt_set in items:
        tok = (tokenized or {}).get((fmt, split)) or tokenized_set(tokenizer, task, prompt_set)
        results.setdefault(fmt, {})[split] = _set_metrics(fmt, prompt_scores(model, tok, batch_size=batch_size))
    return results


def _set_metrics(fmt: str, scores: PromptScores) -> dict[str, float | int | None]:
    """One leaf of ``evaluate_task``: ``set_accuracy``, plus ``edit_error`` for neighborhood formats."""
    metrics = set_accuracy(scores)
    if fmt.startswith("neighborhood"):
        metrics["edit_error"] = metrics["edit_acc"]
    return metrics


def evaluate_task_variants(
    model: Any,
    tokenizer: Any,
    task: FactTask,
    deltas: Any,
    formats: list[str] | tuple[str, ...] | None = None,
    batch_size: int = 64,
    tokenized: dict[tuple[str, str], TokenizedPrompts] | None = None,
) -> list[dict[str, dict[str, dict[str, float | int | None]]]]:
    """``evaluate_task`` of each of the K configurations of ``deltas`` (a ``mu_fast.edit.batched.BatchedDeltas``
    over ``model``, none applied), without writing any of them into the model: every prompt set is scored for all K
    in one forward per batch (``prompt_scores_variants``; ``variant_prompts_per_batch`` prompts x K rows each).

    Returns K results; element k is ``evaluate_task`` under ``deltas.variant(k)`` (same keys and meaning; the
    numbers equal up to float summation order, ~1e-16 in fp64).
    """
    results: list[dict[str, dict[str, dict[str, float | int | None]]]] = [{} for _ in range(len(deltas))]
    for (fmt, split), prompt_set in task_prompt_sets(task, formats).items():
        tok = (tokenized or {}).get((fmt, split)) or tokenized_set(tokenizer, task, prompt_set)
        for out, scores in zip(results, prompt_scores_variants(model, tok, deltas, batch_size), strict=True):
            out.setdefault(fmt, {})[split] = _set_metrics(fmt, scores)
    return results
