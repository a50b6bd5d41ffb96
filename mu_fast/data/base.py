"""The shared data interfaces: prompt sets, fact tasks, tokenization (once) and padded batches.

Every dataset (Sports Facts, CounterFact, the organism's synthetic facts) produces a ``FactTask``: forget
and maintain ``PromptSet``s in the training format, the same facts in other formats (Q/A, MCQ, paraphrase,
neighborhood), and generic text for the LM retain loss. A ``PromptSet`` holds strings; ``tokenize_prompts``
turns it into token ids once, with the label token chosen as in the paper (``first`` token of the answer
for CounterFact, ``last`` for sports), and ``pad_batch`` builds padded batches with the index of each
prompt's last real token (the only position whose logits the losses and metrics read).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

LABEL_TOKEN_RULES = ("first", "last")


@dataclass(frozen=True)
class PromptSet:
    """Prompts of one format whose answer is the next token after the prompt.

    prompts: N strings. answers: N true continuations (e.g. " basketball", " A"). edit_answers: N injected
    continuations (editing) or None (unlearning). choices: answer strings the continuous accuracy normalises
    over (the 4 sports, or " A".." D"); None means the full vocabulary. subjects: the subject string inside
    each prompt (for subject-position sites). fact_ids: which fact each prompt belongs to (paraphrases give
    several prompts per fact). label_token: which token of the answer is the label.
    """

    prompts: Sequence[str]
    answers: Sequence[str]
    edit_answers: Sequence[str] | None = None
    choices: Sequence[str] | None = None
    subjects: Sequence[str] | None = None
    fact_ids: Sequence[int] | None = None
    label_token: str = "first"
    name: str = ""

    def __post_init__(self) -> None:
        n = len(self.prompts)
        for field_name in ("answers", "edit_answers", "subjects", "fact_ids"):
            value = getattr(self, field_name)
            if value is not None and len(value) != n:
                raise ValueError(f"PromptSet {self.name!r}: {field_name} has {len(value)} entries for {n} prompts")
        if self.label_token not in LABEL_TOKEN_RULES:
            raise ValueError(f"label_token must be one of {LABEL_TOKEN_RULES}; got {self.label_token!r}")
        if self.choices is not None:
            missing = sorted({a for a in self.answers if a not in self.choices})
            if missing:
                raise ValueError(f"PromptSet {self.name!r}: answers {missing[:5]} are not among the choices {list(self.choices)}")

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, indices: Sequence[int] | slice, name: str | None = None) -> PromptSet:
        """The prompts at ``indices`` (a slice or list), keeping every per-prompt field aligned."""
        idx = list(range(len(self)))[indices] if isinstance(indices, slice) else list(indices)

        def take(values: Sequence[Any] | None) -> list[Any] | None:
            return None if values is None else [values[i] for i in idx]

        return replace(
            self,
            prompts=take(self.prompts),
            answers=take(self.answers),
            edit_answers=take(self.edit_answers),
            subjects=take(self.subjects),
            fact_ids=take(self.fact_ids),
            name=self.name if name is None else name,
        )

    def require_nonempty(self, what: str) -> PromptSet:
        if len(self) == 0:
            raise ValueError(f"the {what} set {self.name!r} is empty; choose a forget split that selects at least one fact")
        return self


@dataclass
class FactTask:
    """Everything an edit and its evaluation read about one set of facts.

    forget_train / forget_test: the facts to edit or unlearn, in the training format (equal for ``unsplit``
    splits; first / second half for ``split``). maintain_train / maintain_test: facts that must not change.
    formats: other prompt formats of the same facts, ``{"qa": {"forget": PromptSet, "maintain": PromptSet},
    "mcq": ..., "paraphrase": ..., "neighborhood": ...}``. lm_texts: generic text for the LM retain loss.
    unlearn: True when the forget loss is log(1-p) (no edit target). classes: the answer classes (sports)
    used by latent probes, or None.
    """

    name: str
    forget_train: PromptSet
    forget_test: PromptSet
    maintain_train: PromptSet
    maintain_test: PromptSet
    formats: dict[str, dict[str, PromptSet]] = field(default_factory=dict)
    lm_texts: list[str] = field(default_factory=list)
    unlearn: bool = False
    classes: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.forget_train.require_nonempty("forget")
        self.forget_test.require_nonempty("forget test")
        if not self.unlearn and self.forget_train.edit_answers is None:
            raise ValueError(
                f"task {self.name!r} edits facts but its forget set has no edit_answers; pass unlearn=True "
                "for log(1-p) unlearning or give edit targets"
            )


# ------------------------------------------------------------------ tokenize
@dataclass
class TokenizedPrompts:
    """Token ids of a PromptSet, computed once.

    input_ids: N unpadded lists. answer_ids / edit_ids: ``[N]`` int64 label token ids. choice_ids: ``[C]``
    int64 or None. answer_choice / edit_choice: ``[N]`` int64 index into choices (or None). subject_last:
    ``[N]`` int64 index of the subject's last token in each prompt (or None without subjects); subject_first:
    ``[N]`` int64 index of its first token (subject tokens are ``subject_first..subject_last`` inclusive).
    """

    input_ids: list[list[int]]
    answer_ids: torch.Tensor
    edit_ids: torch.Tensor | None
    choice_ids: torch.Tensor | None
    answer_choice: torch.Tensor | None
    edit_choice: torch.Tensor | None
    subject_last: torch.Tensor | None
    source: PromptSet
    subject_first: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.input_ids)

    def subset(self, indices: Sequence[int]) -> TokenizedPrompts:
        idx = torch.as_tensor(list(indices), dtype=torch.int64)

        def take(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[idx]

        return TokenizedPrompts(
            [self.input_ids[i] for i in idx.tolist()],
            self.answer_ids[idx],
            take(self.edit_ids),
            self.choice_ids,
            take(self.answer_choice),
            take(self.edit_choice),
            take(self.subject_last),
            self.source.subset(idx.tolist()),
            take(self.subject_first),
        )


def answer_token_id(tokenizer: Any, answer: str, which: str = "first") -> int:
    """The label token of an answer continuation: its ``first`` or ``last`` token, special tokens skipped."""
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids = [i for i in ids if i not in special]
    if not ids:
        raise ValueError(f"answer {answer!r} tokenizes to no tokens; check the tokenizer and the data")
    return int(ids[0] if which == "first" else ids[-1])


def tokenize_prompts(tokenizer: Any, prompts: PromptSet) -> TokenizedPrompts:
    """Tokenize a PromptSet once (prompts with the tokenizer's special tokens, answers without)."""
    if len(prompts) == 0:
        raise ValueError(f"cannot tokenize the empty prompt set {prompts.name!r}")
    enc = tokenizer(list(prompts.prompts), add_special_tokens=True, return_offsets_mapping=prompts.subjects is not None)
    cache: dict[str, int] = {}

    def label(answer: str) -> int:
        if answer not in cache:
            cache[answer] = answer_token_id(tokenizer, answer, prompts.label_token)
        return cache[answer]

    answer_ids = torch.tensor([label(a) for a in prompts.answers], dtype=torch.int64)
    edit_ids = None if prompts.edit_answers is None else torch.tensor([label(a) for a in prompts.edit_answers], dtype=torch.int64)
    choice_ids = answer_choice = edit_choice = None
    if prompts.choices is not None:
        choices = list(prompts.choices)
        choice_ids = torch.tensor([label(c) for c in choices], dtype=torch.int64)
        if len(set(choice_ids.tolist())) != len(choices):
            raise ValueError(f"choices {choices} share label tokens under this tokenizer; the metric would be ambiguous")
        answer_choice = torch.tensor([choices.index(a) for a in prompts.answers], dtype=torch.int64)
        if prompts.edit_answers is not None and all(a in choices for a in prompts.edit_answers):
            edit_choice = torch.tensor([choices.index(a) for a in prompts.edit_answers], dtype=torch.int64)
    subject_first = subject_last = None
    if prompts.subjects is not None:
        spans = [
            _subject_token_span(p, s, offs)
            for p, s, offs in zip(prompts.prompts, prompts.subjects, enc["offset_mapping"], strict=True)
        ]
        subject_first = torch.tensor([a for a, _ in spans], dtype=torch.int64)
        subject_last = torch.tensor([b for _, b in spans], dtype=torch.int64)
    return TokenizedPrompts(
        [list(ids) for ids in enc["input_ids"]],
        answer_ids,
        edit_ids,
        choice_ids,
        answer_choice,
        edit_choice,
        subject_last,
        prompts,
        subject_first,
    )


def _subject_token_span(prompt: str, subject: str, offsets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """Indices of the first and last token overlapping the subject's last occurrence in the prompt."""
    start = prompt.rfind(subject)
    if start < 0:
        raise ValueError(f"subject {subject!r} does not occur in the prompt {prompt!r}")
    end = start + len(subject)
    covering = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
    if not covering:
        raise ValueError(f"no token of the prompt {prompt!r} covers the subject {subject!r}")
    return covering[0], covering[-1]


# ------------------------------------------------------------------- batches
@dataclass
class Batch:
    """A padded batch. input_ids / attention_mask / position_ids: ``[B, T]`` int64; last_pos: ``[B]`` int64
    index of each row's last real token."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    last_pos: torch.Tensor

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.position_ids, self.last_pos)))

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)  # type: ignore[return-value]


def pad_batch(
    sequences: Sequence[Sequence[int]], pad_id: int, side: str = "right", max_len: int | None = None
) -> Batch:
    """Pad token id lists into a Batch. Position ids count real tokens only, so results do not depend on
    the padding side. ``max_len`` truncates each sequence from the right (keeps the first tokens)."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right'; got {side!r}")
    if not sequences:
        raise ValueError("cannot build a batch from zero sequences")
    seqs = [list(s)[:max_len] if max_len else list(s) for s in sequences]
    if any(len(s) == 0 for s in seqs):
        raise ValueError("a sequence in the batch is empty")
    T = max(len(s) for s in seqs)
    B = len(seqs)
    ids = torch.full((B, T), pad_id, dtype=torch.int64)
    mask = torch.zeros((B, T), dtype=torch.int64)
    for i, s in enumerate(seqs):
        if side == "right":
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        else:
            ids[i, T - len(s) :] = torch.tensor(s)
            mask[i, T - len(s) :] = 1
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    last_pos = torch.tensor([len(s) - 1 if side == "right" else T - 1 for s in seqs], dtype=torch.int64)
    return Batch(ids, mask, position_ids, last_pos)


def pad_id_of(tokenizer: Any) -> int:
    """The tokenizer's pad id, falling back to EOS as the paper's code does."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token")
    return int(pad)
