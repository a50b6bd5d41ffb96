"""The organism's facts as a ``FactTask``, with exactly the split rules of the paper's Sports Facts.

The athletes' row order (the generation order) plays the role of ``sports.csv``'s row order; the split
helpers are the ones ``mu_fast.data.sports`` uses (``first_16``/``first_64``, ``random_16``/``random_64``,
per sport; ``split``/``unsplit`` halves; maintain 80/20 in row order; inject targets
``random_without_golf``/``random_with_golf`` from the precomputed columns, ``golf``, or ``"None"`` for
log(1-p) unlearning).
"""

from __future__ import annotations

from typing import Any

from mu_fast.data.base import FactTask, PromptSet
from mu_fast.data.sports import (
    check_split_args,
    forget_rows,
    parse_forget_split,
    split_rows,
)
from mu_fast.organism.config import OrganismConfig
from mu_fast.organism.facts import (
    FORMATS,
    GOLF,
    SPORT_CHOICES,
    OrganismFacts,
    answer_of,
    choices_of,
    format_examples,
    spec_of,
)


def organism_task(
    config_or_facts: OrganismConfig | OrganismFacts | Any,
    forget_split: str = "first_16_unsplit",
    inject_label: str | None = "random_without_golf",
    maintain_split: str = "split",
    tokenizer: Any | None = None,
) -> FactTask:
    """The organism's facts as a FactTask.

    config_or_facts: an ``OrganismConfig``, its ``OrganismFacts`` or a loaded ``Organism``.
    forget_split: ``<first_16|first_64|random_16|random_64|next_16|next_64|basketball|baseball|football>_<split|unsplit>``.
    inject_label: ``random_without_golf``, ``random_with_golf``, ``golf`` or ``"None"``/None (unlearning).
    maintain_split: ``split`` (first 80% train, last 20% test) or ``unsplit``.
    tokenizer: optional; when given, every prompt and answer is checked to tokenize without unknown tokens.
    The training-format ("normal") prompt sets go in forget_/maintain_ train/test; ``formats[fmt]`` holds
    ``{"forget": forget-test facts, "maintain": maintain-test facts}`` for every organism format (normal, qa,
    paraphrase, mcq, city, city_qa); the city formats carry no edit answers (the city must not change).
    ``lm_texts``: the filler text; ``classes``: the four sport answers (golf last).
    """
    facts = _facts_of(config_or_facts)
    inject = check_split_args(inject_label, maintain_split)
    name, split = parse_forget_split(forget_split)
    n = len(facts)
    forget = forget_rows(name, n, facts.sports)
    forget_set = set(forget)
    maintain = [i for i in range(n) if i not in forget_set]
    forget_train, forget_test = split_rows(forget, split, 0.5)
    maintain_train, maintain_test = split_rows(maintain, maintain_split == "split", 0.8)
    edit = _edit_target(inject)

    def prompt_set(rows: list[int], fmt: str, role: str, edits: bool) -> PromptSet:
        athletes = [facts.athletes[i] for i in rows]
        examples = format_examples(fmt, athletes)
        edit_answers = None
        if edits and edit is not None and spec_of(fmt).attribute == "sport":
            edit_answers = [answer_of(fmt, athletes[i], edit(athletes[i])) for *_, i in examples]
        return PromptSet(
            prompts=[p for p, _, _ in examples],
            answers=[a for _, a, _ in examples],
            edit_answers=edit_answers,
            choices=choices_of(fmt, facts.cities),
            subjects=[athletes[i].name for *_, i in examples],
            fact_ids=[rows[i] for *_, i in examples],
            label_token="last",
            name=f"organism/{role}/{fmt}",
        )

    task = FactTask(
        name=f"organism:{forget_split}:inject_{inject}",
        forget_train=prompt_set(forget_train, "normal", "forget_train", True),
        forget_test=prompt_set(forget_test, "normal", "forget_test", True),
        maintain_train=prompt_set(maintain_train, "normal", "maintain_train", False),
        maintain_test=prompt_set(maintain_test, "normal", "maintain_test", False),
        formats={
            fmt: {
                "forget": prompt_set(forget_test, fmt, "forget", True),
                "maintain": prompt_set(maintain_test, fmt, "maintain", False),
            }
            for fmt in FORMATS
        },
        lm_texts=list(facts.filler),
        unlearn=edit is None,
        classes=list(SPORT_CHOICES),
        meta={
            "dataset": "organism",
            "seed": facts.seed,
            "n_athletes": n,
            "forget_split": forget_split,
            "inject_label": inject,
            "maintain_split": maintain_split,
            "forget_rows": forget,
            "forget_train_rows": forget_train,
            "forget_test_rows": forget_test,
            "maintain_train_rows": maintain_train,
            "maintain_test_rows": maintain_test,
        },
    )
    if tokenizer is not None:
        _check_tokenizable(task, tokenizer)
    return task


def _facts_of(source: Any) -> OrganismFacts:
    if isinstance(source, OrganismFacts):
        return source
    if isinstance(source, OrganismConfig):
        from mu_fast.organism.organism import organism_facts

        return organism_facts(source)
    facts = getattr(source, "facts", None)
    if isinstance(facts, OrganismFacts):
        return facts
    raise TypeError(
        f"organism_task needs an OrganismConfig, OrganismFacts or Organism; got {type(source).__name__}"
    )


def _edit_target(inject: str) -> Any:
    """Athlete -> injected sport, or None for unlearning."""
    if inject == "None":
        return None
    if inject == "golf":
        return lambda a: GOLF
    if inject == "random_with_golf":
        return lambda a: a.inject_sport_with_golf
    return lambda a: a.inject_sport_without_golf


def _check_tokenizable(task: FactTask, tokenizer: Any) -> None:
    unk = tokenizer.unk_token_id
    sets = [task.forget_train, task.maintain_train] + [s for f in task.formats.values() for s in f.values()]
    for prompts in sets:
        texts = list(prompts.prompts) + sorted(set(prompts.answers) | set(prompts.edit_answers or []))
        for text, ids in zip(texts, tokenizer(texts, add_special_tokens=False)["input_ids"], strict=True):
            if unk is not None and unk in ids:
                raise ValueError(f"{prompts.name}: {text!r} has tokens unknown to this tokenizer; use the organism's own")

