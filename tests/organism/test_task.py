"""organism_task follows the paper's Sports Facts split and inject rules (reference/authors_repo.md §1.1)."""

from __future__ import annotations

import pytest
import torch

from mu_fast.data.base import FactTask, tokenize_prompts
from mu_fast.organism import (
    FORMATS,
    SPORT_CHOICES,
    SPORTS,
    OrganismConfig,
    build_tokenizer,
    make_facts,
    organism_task,
)
from mu_fast.organism.facts import MCQ_CHOICES, MCQ_LETTERS

N = 240


@pytest.fixture(scope="module")
def facts():
    return make_facts(N, n_cities=4, seed=5)


def _expected_forget(name: str, facts) -> list[int]:
    if name.startswith("first_"):
        return list(range(int(name.split("_")[1])))
    if name.startswith("random_"):
        k = int(name.split("_")[1])
        return torch.randperm(N, generator=torch.Generator().manual_seed(k))[:k].tolist()
    return [i for i, a in enumerate(facts.athletes) if a.sport == name]


@pytest.mark.parametrize("maintain_split", ["split", "unsplit"])
@pytest.mark.parametrize("halves", ["split", "unsplit"])
@pytest.mark.parametrize("name", ["first_16", "first_64", "random_16", "basketball", "football"])
def test_splits_follow_the_sports_rules(facts, name: str, halves: str, maintain_split: str) -> None:
    task = organism_task(facts, f"{name}_{halves}", "random_without_golf", maintain_split)
    assert isinstance(task, FactTask) and not task.unlearn
    forget = _expected_forget(name, facts)
    assert task.meta["forget_rows"] == forget
    if halves == "split":
        k = len(forget) // 2
        assert task.meta["forget_train_rows"] == forget[:k] and task.meta["forget_test_rows"] == forget[k:]
    else:
        assert task.meta["forget_train_rows"] == task.meta["forget_test_rows"] == forget
    maintain = [i for i in range(N) if i not in set(forget)]
    train, test = task.meta["maintain_train_rows"], task.meta["maintain_test_rows"]
    if maintain_split == "split":
        k = int(0.8 * len(maintain))
        assert train == maintain[:k] and test == maintain[k:]
    else:
        assert train == test == maintain
    assert not set(train) & set(forget) and not set(test) & set(forget)
    # Prompt sets hold exactly those facts, in row order, with the athletes' names as subjects.
    assert list(task.forget_train.fact_ids) == task.meta["forget_train_rows"]
    assert list(task.maintain_test.fact_ids) == test
    assert list(task.forget_test.subjects) == [facts.athletes[i].name for i in task.meta["forget_test_rows"]]
    if name in SPORTS:
        assert {facts.athletes[i].sport for i in forget} == {name}


@pytest.mark.parametrize("inject", ["random_without_golf", "random_with_golf", "golf", "None", None])
def test_inject_labels(facts, inject) -> None:
    task = organism_task(facts, "first_64_unsplit", inject)
    rows = task.meta["forget_rows"]
    if inject in ("None", None):
        assert task.unlearn and task.forget_train.edit_answers is None
        assert all(s["forget"].edit_answers is None for s in task.formats.values())
        return
    column = {"random_without_golf": "inject_sport_without_golf", "random_with_golf": "inject_sport_with_golf"}
    expected = ["golf" if inject == "golf" else getattr(facts.athletes[i], column[inject]) for i in rows]
    assert list(task.forget_train.edit_answers) == [" " + s for s in expected]
    assert all(e != a for e, a in zip(task.forget_train.edit_answers, task.forget_train.answers, strict=True))
    assert list(task.formats["mcq"]["forget"].edit_answers) == [MCQ_LETTERS[s] for s in expected]
    if inject == "random_without_golf":
        assert " golf" not in task.forget_train.edit_answers
    # Maintain sets and the city formats carry no edit targets.
    assert task.maintain_train.edit_answers is None
    assert task.formats["city"]["forget"].edit_answers is None


def test_formats_choices_and_classes(facts) -> None:
    task = organism_task(facts)
    assert set(task.formats) == set(FORMATS)
    assert task.classes == list(SPORT_CHOICES) and task.lm_texts == list(facts.filler)
    for fmt, sets in task.formats.items():
        per_fact = len(sets["forget"]) // len(task.meta["forget_test_rows"])  # 2 for paraphrases
        assert list(sets["forget"].fact_ids)[::per_fact] == task.meta["forget_test_rows"]
        assert set(sets["maintain"].fact_ids) == set(task.meta["maintain_test_rows"])
        choices = sets["forget"].choices
        if fmt == "mcq":
            assert tuple(choices) == MCQ_CHOICES
        elif fmt.startswith("city"):
            assert tuple(choices) == tuple(" " + c for c in facts.cities)
        else:
            assert tuple(choices) == SPORT_CHOICES
        assert sets["forget"].label_token == "last"
    assert task.formats["normal"]["forget"].prompts == task.forget_test.prompts


def test_task_tokenizes_with_the_organism_tokenizer(facts) -> None:
    tok = build_tokenizer(facts)
    task = organism_task(facts, "first_16_split", "golf", tokenizer=tok)
    t = tokenize_prompts(tok, task.forget_train)
    assert torch.equal(t.edit_ids, torch.full((8,), tok.convert_tokens_to_ids("golf")))
    assert t.edit_choice is not None and set(t.edit_choice.tolist()) == {SPORT_CHOICES.index(" golf")}


def test_task_accepts_a_config(facts) -> None:
    config = OrganismConfig.ci(n_athletes=N, seed=5)
    assert organism_task(config).forget_train.prompts == organism_task(facts).forget_train.prompts


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(forget_split="first_17_unsplit"), "forget_split"),
        (dict(forget_split="first_16"), "forget_split"),
        (dict(inject_label="tennis"), "inject_label"),
        (dict(maintain_split="half"), "maintain_split"),
    ],
)
def test_bad_task_arguments_raise(facts, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        organism_task(facts, **kwargs)


def test_bad_source_raises() -> None:
    with pytest.raises(TypeError, match="OrganismConfig"):
        organism_task("demo")
