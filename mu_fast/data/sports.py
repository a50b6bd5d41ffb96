"""Sports Facts (Nanda et al. 2023) exactly as the paper's code uses it (reference/authors_repo.md §1.1).

``sports.csv`` (1,559 athletes of football, baseball and basketball, already shuffled) fixes every split by
its row order. ``forget_split`` is ``<name>_<split|unsplit>``: ``first_16``/``first_64`` take rows 0..15 /
0..63 (the paper's "16/64 athletes"), ``next_16``/``next_64`` rows 16..31 / 64..127 (disjoint sets of the same size, for
choosing hyperparameters), ``random_16``/``random_64`` a torch randperm seeded with 16/64,
``basketball``/``baseball``/``football`` every athlete of that sport. ``unsplit``: forget train = test = the
forget set; ``split``: train the first half, test the second half (relearning and Full-Sports). Maintain is
every other row, train the first 80% and test the last 20%, in row order. Labels are the **last** token of
the answer. The edit target comes from the precomputed columns (``random_without_golf``,
``random_with_golf``), is golf for every athlete (``golf``), or is absent (``"None"``: log(1-p) unlearning).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from mu_fast.data.base import FactTask, PromptSet
from mu_fast.data.datadir import read_table

SPORTS = ("football", "baseball", "basketball")
SPORT_CHOICES = (" football", " baseball", " basketball", " golf")
MCQ_CHOICES = (" A", " B", " C", " D")
MCQ_LETTER = {"football": " A", "baseball": " B", "basketball": " C", "golf": " D"}
INJECT_LABELS = ("random_without_golf", "random_with_golf", "golf", "None")
SPORTS_FORMATS = ("normal", "qa", "mcq")
# next_N: rows N..2N-1, the facts after first_N, a disjoint set of the same size to choose hyperparameters on
# (mu_fast.sweep.lr_rule) without touching first_N.
FORGET_SPLIT_NAMES = ("first_16", "first_64", "random_16", "random_64", "next_16", "next_64") + SPORTS

_GOLFER = "Tiger Woods"
_SYSTEM = (
    "You are a helpful chatbot that answers questions about athletes. Please be maximally helpful and factually correct."
)
_OPTIONS = "\nA: Football\nB: Baseball\nC: Basketball\nD: Golf\n\nAnswer:"


def sports_prompt(athlete: str, fmt: str = "normal", system_prompt: bool = True) -> str:
    """The prompt of one athlete in a format of the paper's evals.

    ``normal``: the two-line training prompt. ``qa``: the deep eval's "Normal" (a Q/A format behind a
    system preamble; without ``system_prompt`` it is the training prompt, as in relearning). ``mcq``: the
    fixed-order A-D question with one golf example answered D (with or without the preamble).
    """
    if fmt == "normal" or (fmt == "qa" and not system_prompt):
        return f"Fact: {_GOLFER} plays the sport of golf\nFact: {athlete} plays the sport of"
    if fmt == "qa":
        return (
            f"{_SYSTEM} Question: What sport does {_GOLFER} play? Answer: golf\n"
            f"Question: What sport does {athlete} play? Answer:"
        )
    if fmt == "mcq":
        if system_prompt:
            return (
                f"{_SYSTEM}\nQuestion: What sport does {_GOLFER} play?{_OPTIONS} D\n\n"
                f"Question: What sport does {athlete} play?{_OPTIONS}"
            )
        return f"Fact: {_GOLFER} plays the sport of{_OPTIONS} D\n\nFact: {athlete} plays the sport of{_OPTIONS}"
    raise ValueError(f"unknown sports format {fmt!r}; choose one of {SPORTS_FORMATS}")


def parse_forget_split(forget_split: str, names: Sequence[str] = FORGET_SPLIT_NAMES) -> tuple[str, bool]:
    """``"first_16_split"`` -> ``("first_16", True)``; raises ``ValueError`` on an unknown name."""
    name, _, suffix = str(forget_split).rpartition("_")
    if name not in names or suffix not in ("split", "unsplit"):
        options = ", ".join(f"{n}_<split|unsplit>" for n in names)
        raise ValueError(f"forget_split={forget_split!r} is not recognised; choose one of {options}")
    return name, suffix == "split"


def seeded_randperm(n: int, seed: int) -> list[int]:
    """``torch.manual_seed(seed); torch.randperm(n)`` as the paper's code, without touching the global RNG."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def forget_rows(name: str, n_rows: int, sports: Sequence[str] | None = None) -> list[int]:
    """Row indices of the forget set ``name`` (``first_N``, ``random_N`` or a sport), in the paper's order."""
    if name.startswith("first_"):
        k = int(name.split("_")[1])
        if k > n_rows:
            raise ValueError(f"forget split {name!r} needs {k} rows but the table has {n_rows}")
        return list(range(k))
    if name.startswith("next_"):
        k = int(name.split("_")[1])
        if 2 * k > n_rows:
            raise ValueError(f"forget split {name!r} needs {2 * k} rows (rows {k}..{2 * k - 1}) but the table has {n_rows}")
        return list(range(k, 2 * k))
    if name.startswith("random_"):
        k = int(name.split("_")[1])
        return seeded_randperm(n_rows, k)[:k]
    if sports is None:
        raise ValueError(f"forget split {name!r} selects by sport, which this dataset does not have")
    return [i for i, s in enumerate(sports) if s == name]


def check_split_args(inject_label: str | None, maintain_split: str) -> str:
    """Validate the edit target and maintain split of a sports-style task; return the inject label as a string
    (``"None"`` for unlearning)."""
    inject = "None" if inject_label is None else str(inject_label)
    if inject not in INJECT_LABELS:
        raise ValueError(f"inject_label={inject_label!r} is not one of {INJECT_LABELS}")
    if maintain_split not in ("split", "unsplit"):
        raise ValueError(f"maintain_split={maintain_split!r}; choose 'split' (80/20, the paper) or 'unsplit'")
    return inject


def split_rows(rows: Sequence[int], split: bool, fraction: float) -> tuple[list[int], list[int]]:
    """(train, test): the first ``int(fraction * n)`` rows and the rest, or both = all rows when unsplit."""
    rows = list(rows)
    if not split:
        return rows, list(rows)
    k = int(fraction * len(rows))
    return rows[:k], rows[k:]


def load_sports_task(
    forget_split: str = "first_16_unsplit",
    inject_label: str | None = "random_without_golf",
    maintain_split: str = "split",
    data_dir: str | os.PathLike | None = None,
    lm_texts: Sequence[str] | None = None,
    system_prompt: bool = True,
) -> FactTask:
    """The paper's Sports Facts task.

    forget_split: ``<first_16|first_64|random_16|random_64|next_16|next_64|basketball|baseball|football>_<split|unsplit>``.
    inject_label: ``random_without_golf`` (Sports-Athlete-Editing), ``golf`` (Full-Sports-Editing),
    ``random_with_golf``, or ``"None"``/None (Sports-Unlearning: ``unlearn=True``, no edit answers).
    maintain_split: ``split`` (80/20, the paper) or ``unsplit`` (train = test = every maintain row).
    system_prompt: whether the ``qa`` and ``mcq`` formats carry the deep eval's system preamble (the
    paper's deep evals: True; its relearning evals: False).
    Training-format prompt sets go in forget_/maintain_ train/test; ``formats[fmt]["forget"|"maintain"]``
    hold the forget-test and maintain-test facts in each of ``normal``, ``qa``, ``mcq``.
    """
    inject = check_split_args(inject_label, maintain_split)
    name, split = parse_forget_split(forget_split)
    df = read_table("sports.csv", data_dir)
    _check_columns(df, ("athlete", "sport", "inject_sport_with_golf", "inject_sport_without_golf"), "sports.csv")
    athletes = [str(a) for a in df["athlete"]]
    sports = [str(s) for s in df["sport"]]
    unknown = sorted(set(sports) - set(SPORTS))
    if unknown:
        raise ValueError(f"sports.csv has sports {unknown} outside {SPORTS}; is this the paper's sports.csv?")
    if inject == "None":
        edits = None
    elif inject == "golf":
        edits = ["golf"] * len(df)
    else:
        column = "inject_sport_without_golf" if inject == "random_without_golf" else "inject_sport_with_golf"
        edits = [str(s) for s in df[column]]

    forget = forget_rows(name, len(df), sports)
    forget_set = set(forget)
    maintain = [i for i in range(len(df)) if i not in forget_set]
    forget_train, forget_test = split_rows(forget, split, 0.5)
    maintain_train, maintain_test = split_rows(maintain, maintain_split == "split", 0.8)

    def prompt_set(rows: list[int], fmt: str, role: str) -> PromptSet:
        answer_of = (lambda s: MCQ_LETTER[s]) if fmt == "mcq" else (lambda s: f" {s}")
        return PromptSet(
            prompts=[sports_prompt(athletes[i], fmt, system_prompt) for i in rows],
            answers=[answer_of(sports[i]) for i in rows],
            edit_answers=None if edits is None else [answer_of(edits[i]) for i in rows],
            choices=MCQ_CHOICES if fmt == "mcq" else SPORT_CHOICES,
            subjects=[athletes[i] for i in rows],
            fact_ids=list(rows),
            label_token="last",
            name=f"sports/{role}/{fmt}",
        )

    return FactTask(
        name=f"sports:{forget_split}:inject_{inject}",
        forget_train=prompt_set(forget_train, "normal", "forget_train"),
        forget_test=prompt_set(forget_test, "normal", "forget_test"),
        maintain_train=prompt_set(maintain_train, "normal", "maintain_train"),
        maintain_test=prompt_set(maintain_test, "normal", "maintain_test"),
        formats={
            fmt: {"forget": prompt_set(forget_test, fmt, "forget"), "maintain": prompt_set(maintain_test, fmt, "maintain")}
            for fmt in SPORTS_FORMATS
        },
        lm_texts=list(lm_texts or []),
        unlearn=edits is None,
        classes=list(SPORT_CHOICES),
        meta={
            "dataset": "sports",
            "forget_split": forget_split,
            "inject_label": inject,
            "maintain_split": maintain_split,
            "system_prompt": system_prompt,
            "n_rows": len(df),
            "forget_rows": forget,
            "forget_train_rows": forget_train,
            "forget_test_rows": forget_test,
            "maintain_train_rows": maintain_train,
            "maintain_test_rows": maintain_test,
        },
    )


def _check_columns(df: Any, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{what} lacks the columns {missing} (has {list(df.columns)}); use the paper's file")
