"""Does the model know the facts it is about to edit? A check to run before localizing or editing.

Editing facts the model never knew measures nothing: forget error starts at chance and "succeeds" by default.
Two things give that away before any work is done: prompts or answers that tokenize to the tokenizer's unknown
token (e.g. real athletes' names under the organism's made-up-syllable vocabulary), and accuracy at chance in
the training format. ``check_known_facts`` measures both; ``KnownFacts.require`` refuses (or, when allowed,
warns) with one message naming every problem.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

from mu_fast.data.base import FactTask, PromptSet, TokenizedPrompts
from mu_fast.evaluate.formats import NORMAL, evaluate_task, task_prompt_sets, tokenized_set

# Accuracy counts as "known" from halfway between chance and 1 (0.625 for four choices, 0.5 without choices).
MIN_GAIN_OVER_CHANCE = 0.5
DEFAULT_OVERRIDE = "allow_unknown_facts=True"


@dataclass
class KnownFacts:
    """Per prompt set ``"format/split"``: argmax accuracy, chance, threshold and unknown-token counts.

    problems: reasons to refuse the edit (unknown tokens anywhere; training-format accuracy below threshold).
    notes: weaker signs shown as warnings (another format below threshold; no unknown token to check).
    """

    sets: dict[str, dict[str, Any]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "problems": list(self.problems), "notes": list(self.notes), "sets": self.sets}

    def message(self, override: str = DEFAULT_OVERRIDE) -> str:
        return ("the model does not know the facts to edit: " + "; ".join(self.problems)
                + ". An edit would start at chance and measure nothing; use a model that knows these facts (or a "
                f"dataset it was trained on), or pass {override} to run anyway")

    def require(self, allow: bool = False, override: str = DEFAULT_OVERRIDE) -> None:
        """Raise ``UnknownFactsError`` if there are problems, unless ``allow`` (then warn loudly); warn notes."""
        if self.problems:
            if not allow:
                raise UnknownFactsError(self, override)
            warnings.warn("RUNNING ANYWAY: " + self.message(override), UnknownFactsWarning, stacklevel=2)
        for note in self.notes:
            warnings.warn(note, UnknownFactsWarning, stacklevel=2)


class UnknownFactsError(ValueError):
    """The model does not know the facts (unknown tokens or accuracy at chance); ``.report`` has the details."""

    def __init__(self, report: KnownFacts, override: str = DEFAULT_OVERRIDE) -> None:
        super().__init__(report.message(override))
        self.report = report


class UnknownFactsWarning(UserWarning):
    """Raised as a warning when a run goes ahead on facts the model does not know (or a format it fails)."""


def chance_accuracy(prompt_set: PromptSet) -> float:
    """Argmax accuracy of a guess: ``1 / len(choices)``, or 0 when the answer is any vocabulary token."""
    return 1.0 / len(prompt_set.choices) if prompt_set.choices else 0.0


def unknown_token_prompts(tokenized: TokenizedPrompts, unk_id: int) -> list[int]:
    """Indices of the prompts whose prompt, answer or edit answer contains the unknown token ``unk_id``."""
    bad = {i for i, ids in enumerate(tokenized.input_ids) if unk_id in ids}
    for labels in (tokenized.answer_ids, tokenized.edit_ids):
        if labels is not None:
            bad.update((labels == unk_id).nonzero().flatten().tolist())
    return sorted(bad)


def check_known_facts(
    model: Any,
    tokenizer: Any,
    task: FactTask,
    baseline: dict[str, dict[str, dict[str, Any]]] | None = None,
    batch_size: int = 64,
    min_gain: float = MIN_GAIN_OVER_CHANCE,
) -> KnownFacts:
    """Unknown tokens in every prompt set of ``task`` and the model's argmax accuracy per format and split.

    baseline: ``evaluate_task(model, tokenizer, task)`` if already computed (else it is computed here). A set is
    "known" when its argmax accuracy is at least ``chance + min_gain * (1 - chance)``. Unknown tokens in any set,
    or the training format ("normal") below the threshold on forget or maintain, are problems; another format
    below the threshold is a note.
    """
    report = KnownFacts()
    sets = {f"{fmt}/{split}": ps for (fmt, split), ps in task_prompt_sets(task).items()}
    sets.setdefault(f"{NORMAL}/forget_train", task.forget_train)
    sets.setdefault(f"{NORMAL}/maintain_train", task.maintain_train)
    unk_id = getattr(tokenizer, "unk_token_id", None)
    if unk_id is None:
        report.notes.append("the tokenizer has no unknown token (byte-level): unknown words cannot be detected")
    unknown: dict[str, int] = {}
    example = ""
    for key, prompt_set in sets.items():
        entry: dict[str, Any] = {"n": len(prompt_set), "chance": chance_accuracy(prompt_set)}
        if unk_id is not None and len(prompt_set):
            bad = unknown_token_prompts(tokenized_set(tokenizer, task, prompt_set), int(unk_id))
            entry["unknown_token_prompts"] = len(bad)
            if bad:
                unknown[key] = len(bad)
                example = example or _example(prompt_set, bad[0])
        report.sets[key] = entry
    if unknown:
        where = ", ".join(f"{k} {n}/{report.sets[k]['n']}" for k, n in unknown.items())
        report.problems.append(f"prompts contain words the tokenizer does not know (they become "
                               f"{tokenizer.unk_token!r}; e.g. {example}): {where}")
    baseline = baseline if baseline is not None else evaluate_task(model, tokenizer, task, batch_size=batch_size)
    for fmt, splits in baseline.items():
        for split, metrics in splits.items():
            key = f"{fmt}/{split}"
            entry = report.sets.setdefault(key, {"n": metrics.get("n")})
            chance = entry.get("chance", 0.0)
            threshold = chance + min_gain * (1.0 - chance)
            accuracy = float(metrics["argmax_acc"])
            entry.update(argmax_acc=accuracy, threshold=threshold, known=accuracy >= threshold)
            if accuracy < threshold and not fmt.startswith("neighborhood"):
                text = f"{key} argmax accuracy {accuracy:.2f} before any edit (chance {chance:.2f}, known from {threshold:.2f})"
                (report.problems if fmt == NORMAL else report.notes).append(text)
    return report


def _example(prompt_set: PromptSet, index: int) -> str:
    if prompt_set.subjects is not None:
        return f"the subject {prompt_set.subjects[index]!r}"
    return f"the prompt {str(prompt_set.prompts[index])[-80:]!r}"
