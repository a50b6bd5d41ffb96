"""Sports Facts splits, edit targets, formats and label tokens match the paper's code (authors_repo.md §1.1)."""

from __future__ import annotations

from collections import Counter

import pandas as pd
import pytest
import torch

from mu_fast.data.base import tokenize_prompts
from mu_fast.data.sports import MCQ_CHOICES, MCQ_LETTER, SPORT_CHOICES, SPORTS, load_sports_task, sports_prompt

# The paper's code asserts these names for first_16 (authors_repo.md §1.1: "DeForest Buckner, Walter Payton,
# ... Stan Van Gundy": 7 football, 5 basketball, 4 baseball).
FIRST_16 = [
    "DeForest Buckner", "Walter Payton", "Anthony DeSclafani", "Kevin Millwood", "Vonta Leach", "Mitch Haniger",
    "Landon Collins", "Charlie Whitehurst", "Mariano Rivera", "Boris Diaw", "Michael Floyd", "Jae Crowder",
    "Damon Stoudamire", "Mario Chalmers", "LaMarr Woodley", "Stan Van Gundy",
]
ALL_SPLITS = [f"{n}_{s}" for n in ("first_16", "first_64", "random_16", "random_64", *SPORTS) for s in ("split", "unsplit")]


@pytest.fixture(scope="module")
def table(data_dir):
    return pd.read_csv(data_dir / "sports.csv")


def test_first_16_are_the_papers_athletes(data_dir):
    task = load_sports_task("first_16_unsplit", data_dir=data_dir)
    assert list(task.forget_train.subjects) == FIRST_16
    assert list(task.forget_test.subjects) == FIRST_16
    assert Counter(task.forget_train.answers) == {" football": 7, " basketball": 5, " baseball": 4}


def test_training_prompt_is_the_csv_prompt(table, data_dir):
    task = load_sports_task("first_64_unsplit", data_dir=data_dir)
    rows = task.meta["maintain_train_rows"] + task.meta["maintain_test_rows"] + task.meta["forget_rows"]
    assert sorted(rows) == list(range(len(table)))
    every = list(task.maintain_train.prompts) + list(task.maintain_test.prompts) + list(task.forget_train.prompts)
    assert every == [table["prompt"][i] for i in rows]
    assert sports_prompt("X Y") == "Fact: Tiger Woods plays the sport of golf\nFact: X Y plays the sport of"


@pytest.mark.parametrize("forget_split", ALL_SPLITS)
def test_split_structure(forget_split, table, data_dir):
    task = load_sports_task(forget_split, "golf", data_dir=data_dir)
    name, _, kind = forget_split.rpartition("_")
    meta = task.meta
    forget, train, test = meta["forget_rows"], meta["forget_train_rows"], meta["forget_test_rows"]
    if name in SPORTS:
        assert forget == [i for i, s in enumerate(table["sport"]) if s == name]
    elif name.startswith("first"):
        assert forget == list(range(int(name[-2:])))
    else:
        with torch.random.fork_rng():  # the paper's exact call: global seed, then randperm
            torch.manual_seed(int(name[-2:]))
            assert forget == torch.randperm(len(table))[: int(name[-2:])].tolist()
    if kind == "unsplit":
        assert train == test == forget
    else:
        assert train == forget[: len(forget) // 2] and test == forget[len(forget) // 2 :]
    maintain = [i for i in range(len(table)) if i not in set(forget)]
    k = int(0.8 * len(maintain))
    assert meta["maintain_train_rows"] == maintain[:k] and meta["maintain_test_rows"] == maintain[k:]
    assert not set(forget) & set(maintain)
    for ps, rows in [(task.forget_train, train), (task.forget_test, test), (task.maintain_train, maintain[:k]),
                     (task.maintain_test, maintain[k:])]:
        assert list(ps.fact_ids) == rows
        assert list(ps.subjects) == [table["athlete"][i] for i in rows]
        assert list(ps.answers) == [f" {table['sport'][i]}" for i in rows]


def test_unsplit_maintain(data_dir):
    task = load_sports_task("first_16_unsplit", maintain_split="unsplit", data_dir=data_dir)
    assert task.meta["maintain_train_rows"] == task.meta["maintain_test_rows"]
    assert len(task.maintain_train) == task.meta["n_rows"] - 16


@pytest.mark.parametrize("inject", ["random_without_golf", "random_with_golf", "golf"])
def test_inject_targets(inject, table, data_dir):
    task = load_sports_task("first_64_unsplit", inject, data_dir=data_dir)
    assert not task.unlearn
    column = {"random_without_golf": "inject_sport_without_golf", "random_with_golf": "inject_sport_with_golf"}.get(inject)
    for ps in [task.forget_train, task.maintain_train, task.maintain_test]:
        assert all(e != a for a, e in zip(ps.answers, ps.edit_answers, strict=True))
        expected = [" golf" if column is None else f" {table[column][i]}" for i in ps.fact_ids]
        assert list(ps.edit_answers) == expected
    if inject == "random_without_golf":
        assert " golf" not in set(task.maintain_train.edit_answers)
    if inject == "random_with_golf":
        assert " golf" in set(task.maintain_train.edit_answers)


def test_unlearning_has_no_edit_answers(data_dir):
    for label in ("None", None):
        task = load_sports_task("basketball_split", label, data_dir=data_dir)
        assert task.unlearn and task.meta["inject_label"] == "None"
        sets = [task.forget_train, task.forget_test] + [ps for f in task.formats.values() for ps in f.values()]
        assert all(ps.edit_answers is None for ps in sets)


@pytest.mark.parametrize("system_prompt", [True, False])
def test_formats(system_prompt, data_dir):
    task = load_sports_task("first_16_split", data_dir=data_dir, system_prompt=system_prompt)
    assert set(task.formats) == {"normal", "qa", "mcq"}
    assert task.classes == list(SPORT_CHOICES)
    for fmt, sets in task.formats.items():
        assert list(sets["forget"].fact_ids) == task.meta["forget_test_rows"]
        assert list(sets["maintain"].fact_ids) == task.meta["maintain_test_rows"]
        for role, ps in sets.items():
            assert ps.label_token == "last"
            assert all(s in p for s, p in zip(ps.subjects, ps.prompts, strict=True))
            if fmt == "mcq":
                assert tuple(ps.choices) == MCQ_CHOICES
                assert list(ps.answers) == [MCQ_LETTER[a.strip()] for a in task.formats["normal"][role].answers]
                assert all(p.endswith("C: Basketball\nD: Golf\n\nAnswer:") and "Answer: D\n\n" in p for p in ps.prompts)
            else:
                assert tuple(ps.choices) == SPORT_CHOICES
                assert list(ps.answers) == list(task.formats["normal"][role].answers)
    normal, qa, mcq = (task.formats[f]["forget"] for f in ("normal", "qa", "mcq"))
    assert list(normal.prompts) == list(task.forget_test.prompts)
    assert list(mcq.answers) == [MCQ_LETTER[a.strip()] for a in normal.answers]
    assert list(mcq.edit_answers) == [MCQ_LETTER[a.strip()] for a in normal.edit_answers]
    assert list(qa.answers) == list(normal.answers)
    if system_prompt:
        assert all(p.startswith("You are a helpful chatbot") and p.endswith("play? Answer:") for p in qa.prompts)
        assert qa.prompts[0].endswith(f"Question: What sport does {qa.subjects[0]} play? Answer:")
    else:
        assert list(qa.prompts) == list(normal.prompts)
        assert mcq.prompts[0].startswith("Fact: Tiger Woods plays the sport of\nA: Football")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"forget_split": "first_32_split"}, "forget_split='first_32_split'"),
        ({"forget_split": "golf_split"}, "not recognised"),
        ({"forget_split": "first_16"}, "not recognised"),
        ({"inject_label": "tennis"}, "inject_label='tennis'"),
        ({"maintain_split": "half"}, "maintain_split='half'"),
    ],
)
def test_bad_arguments(kwargs, match, data_dir):
    with pytest.raises(ValueError, match=match):
        load_sports_task(data_dir=data_dir, **kwargs)


# --------------------------------------------------------------- label tokens
def space_isolating_tokenizer(texts):
    """A word-level tokenizer that makes every space its own token (like Llama-2's leading "▁"), so the
    first token of " football" is the space and only the paper's last-token rule gives distinct labels."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    split = pre_tokenizers.Split(Regex(r"\s|[^\s\w]"), behavior="isolated")
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
    for text in texts:
        for piece, _ in split.pre_tokenize_str(text):
            vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = split
    tok.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def test_label_is_the_last_token(data_dir):
    task = load_sports_task("first_64_split", data_dir=data_dir)
    sets = [task.forget_train, task.formats["qa"]["forget"], task.formats["mcq"]["maintain"]]
    tok = space_isolating_tokenizer([p for ps in sets for p in ps.prompts] + list(SPORT_CHOICES) + list(MCQ_CHOICES))
    for ps in sets:
        tp = tokenize_prompts(tok, ps)
        # The paper's rule: tokenize " sport" with special tokens and take the last id.
        expected = [tok(a)["input_ids"][-1] for a in ps.answers]
        assert tp.answer_ids.tolist() == expected
        assert tp.edit_ids.tolist() == [tok(a)["input_ids"][-1] for a in ps.edit_answers]
        assert all(len(tok(a, add_special_tokens=False)["input_ids"]) == 2 for a in ps.answers)
        for ids, a, b, subject in zip(tp.input_ids, tp.subject_first, tp.subject_last, ps.subjects, strict=True):
            assert "".join(tok.convert_ids_to_tokens(ids[int(a) : int(b) + 1])) == subject
    first_rule = task.forget_train.subset(range(len(task.forget_train)))
    object.__setattr__(first_rule, "label_token", "first")
    with pytest.raises(ValueError, match="share label tokens"):
        tokenize_prompts(tok, first_rule)
