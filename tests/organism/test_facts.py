"""The organism's facts and tokenizer: deterministic, balanced, multi-token names, paper-shaped formats."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from mu_fast.data.base import tokenize_prompts
from mu_fast.organism import (
    CITIES,
    FORMATS,
    SPORT_CHOICES,
    SPORTS,
    build_tokenizer,
    format_prompt_set,
    make_facts,
)
from mu_fast.organism.facts import (
    GOLF,
    MCQ_LETTERS,
    SPORT_VERBS,
    activity_sentences,
    city_sentences,
    format_examples,
)
from mu_fast.organism.tokenizer import vocabulary


@pytest.fixture(scope="module")
def facts_and_tokenizer():
    facts = make_facts(300, n_cities=4, seed=3)
    return facts, build_tokenizer(facts)


@pytest.mark.parametrize("seed", [0, 7])
@pytest.mark.parametrize("n", [20, 301])
def test_facts_are_deterministic_in_the_seed(seed: int, n: int) -> None:
    a, b = make_facts(n, 4, seed), make_facts(n, 4, seed)
    assert a == b
    other = make_facts(n, 4, seed + 1)
    assert a.names != other.names


@pytest.mark.parametrize("n_cities", [2, 4, 8])
@pytest.mark.parametrize("n", [40, 601])
def test_facts_are_balanced_and_consistent(n: int, n_cities: int) -> None:
    facts = make_facts(n, n_cities, seed=1)
    assert len(facts) == n and len(set(facts.names)) == n
    sport_counts = Counter(facts.sports)
    assert set(sport_counts) == set(SPORTS) and max(sport_counts.values()) - min(sport_counts.values()) <= 1
    assert facts.cities == CITIES[:n_cities]
    families: dict[str, set[str]] = {}
    for athlete in facts.athletes:
        family = athlete.name.split(" ")[1]
        families.setdefault(family, set()).add(athlete.city)
        assert athlete.inject_sport_without_golf in SPORTS and athlete.inject_sport_without_golf != athlete.sport
        assert athlete.inject_sport_with_golf in (*SPORTS, GOLF) and athlete.inject_sport_with_golf != athlete.sport
    # The city belongs to the family name; families are balanced over the cities.
    assert all(len(c) == 1 for c in families.values())
    family_cities = Counter(next(iter(c)) for c in families.values())
    assert max(family_cities.values()) - min(family_cities.values()) <= 1
    # Edit targets are spread over the other sports (not a constant).
    assert len({a.inject_sport_without_golf for a in facts.athletes}) == 3


@pytest.mark.parametrize("n", [60, 600])
def test_conjunctive_facts_hide_the_sport_from_each_name_part(n: int) -> None:
    facts = make_facts(n, 4, seed=2, conjunctive=True)
    counts = Counter(facts.sports)
    assert max(counts.values()) - min(counts.values()) <= 1
    by_part: dict[str, dict[str, Counter]] = {"first": {}, "family": {}}
    for athlete in facts.athletes:
        first, family = athlete.name.split(" ")
        by_part["first"].setdefault(first, Counter())[athlete.sport] += 1
        by_part["family"].setdefault(family, Counter())[athlete.sport] += 1
    for family_counts in by_part["family"].values():  # exact: balanced within every family
        values = [family_counts[s] for s in SPORTS]
        assert max(values) - min(values) <= 1
    # Guessing each name part's majority sport is right for at most half of the athletes (chance 1/3).
    for part in ("first", "family"):
        majority = sum(max(c.values()) for c in by_part[part].values()) / n
        assert majority <= 0.5, (part, majority)
    # The default facts, by contrast, let a first name give its athletes' sport away far more often.
    plain = make_facts(n, 4, seed=2)
    plain_first: dict[str, Counter] = {}
    for athlete in plain.athletes:
        plain_first.setdefault(athlete.name.split(" ")[0], Counter())[athlete.sport] += 1
    assert sum(max(c.values()) for c in plain_first.values()) / n > 0.5


def test_bad_fact_settings_raise() -> None:
    with pytest.raises(ValueError, match="n_cities"):
        make_facts(50, n_cities=1)
    with pytest.raises(ValueError, match="n_athletes"):
        make_facts(0)


def test_names_are_several_syllable_tokens(facts_and_tokenizer) -> None:
    facts, tok = facts_and_tokenizer
    for name in facts.names:
        ids = tok(name, add_special_tokens=False)["input_ids"]
        pieces = tok.convert_ids_to_tokens(ids)
        assert 3 <= len(ids) <= 4, (name, pieces)
        assert tok.unk_token_id not in ids
        assert "".join(p.removeprefix("##") for p in pieces) == name.replace(" ", "")
        assert tok.decode(ids) == name


def test_tokenizer_specials_offsets_and_answers(facts_and_tokenizer) -> None:
    facts, tok = facts_and_tokenizer
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert len(tok) == len(vocabulary(facts))
    enc = tok("Fact: Tiger Woods plays the sport of", return_offsets_mapping=True)
    assert enc["input_ids"][0] == tok.bos_token_id
    assert enc["offset_mapping"][1] == (0, 4)  # "Fact"
    answers = [*SPORT_CHOICES, *MCQ_LETTERS.values(), *(" " + c for c in CITIES)]
    ids = [tok(a, add_special_tokens=False)["input_ids"] for a in answers]
    assert all(len(i) == 1 for i in ids), dict(zip(answers, ids, strict=True))
    assert len({i[0] for i in ids}) == len(answers)


def test_tokenizer_round_trips_through_save_pretrained(tmp_path, facts_and_tokenizer) -> None:
    from transformers import PreTrainedTokenizerFast

    facts, tok = facts_and_tokenizer
    tok.save_pretrained(tmp_path)
    loaded = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    texts = [p for p, _, _ in format_examples("mcq", facts.athletes[:5])] + list(facts.filler[:5])
    assert loaded(texts)["input_ids"] == tok(texts)["input_ids"]
    assert loaded(texts[0], return_offsets_mapping=True)["offset_mapping"] == tok(texts[0], return_offsets_mapping=True)["offset_mapping"]


def test_training_text_has_no_unknown_tokens(facts_and_tokenizer) -> None:
    facts, tok = facts_and_tokenizer
    texts = list(facts.filler)
    for athlete in facts.athletes[:50]:
        texts += [t for t, _ in activity_sentences(athlete)] + [t for t, _ in city_sentences(athlete)]
    for fmt in FORMATS:
        texts += [p + a for p, a, _ in format_examples(fmt, facts.athletes[:50])]
    assert all(tok.unk_token_id not in ids for ids in tok(texts)["input_ids"])


def test_activity_and_roster_lines_put_the_attribute_right_after_the_name(facts_and_tokenizer) -> None:
    facts, tok = facts_and_tokenizer
    athlete = facts.athletes[0]
    for sentences, expected in ((activity_sentences(athlete), None), (city_sentences(athlete), athlete.city)):
        for text, prefix in sentences:
            assert text.startswith(prefix) and prefix.endswith(athlete.name)
            full = tok(text)["input_ids"]
            head = tok(prefix)["input_ids"]
            assert full[: len(head)] == head
            nxt = tok.convert_ids_to_tokens(full[len(head)])
            if expected is None:
                assert nxt in SPORT_VERBS[athlete.sport]
            else:
                assert nxt == expected


@pytest.mark.parametrize("fmt", FORMATS)
def test_format_prompt_sets_label_and_subject(fmt: str, facts_and_tokenizer) -> None:
    facts, tok = facts_and_tokenizer
    prompts = format_prompt_set(facts, fmt, range(10, 20))
    assert prompts.label_token == "last" and set(prompts.fact_ids) == set(range(10, 20))
    tokenized = tokenize_prompts(tok, prompts)
    for i, (prompt, subject) in enumerate(zip(prompts.prompts, prompts.subjects, strict=True)):
        assert prompt.count(subject) == 1
        span = tokenized.input_ids[i][tokenized.subject_first[i] : tokenized.subject_last[i] + 1]
        assert tok.decode(span) == subject
    # The label is the answer's (single) token; every answer is one of the choices.
    expected = torch.tensor([tok(a, add_special_tokens=False)["input_ids"][-1] for a in prompts.answers])
    assert torch.equal(tokenized.answer_ids, expected)
    assert tokenized.answer_choice is not None


def test_normal_format_is_the_papers_training_prompt(facts_and_tokenizer) -> None:
    facts, _ = facts_and_tokenizer
    athlete = facts.athletes[0]
    prompt, answer, _ = format_examples("normal", [athlete])[0]
    assert prompt == f"Fact: Tiger Woods plays the sport of golf\nFact: {athlete.name} plays the sport of"
    assert answer == " " + athlete.sport
    mcq_prompt, mcq_answer, _ = format_examples("mcq", [athlete])[0]
    assert "A: Football\nB: Baseball\nC: Basketball\nD: Golf" in mcq_prompt and mcq_prompt.endswith("Answer:")
    assert mcq_answer == MCQ_LETTERS[athlete.sport]
    assert len(format_examples("paraphrase", [athlete])) >= 2
