"""CounterFact filtering, splits, formats and label tokens match the paper's code (authors_repo.md §1.2, §4.3)."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
import torch

from mu_fast.data.base import tokenize_prompts
from mu_fast.data.counterfact import (
    MCQ_TEMPLATE,
    counterfact_sequential_tasks,
    load_counterfact_task,
    parse_prompt_list,
    split_counterfact_table,
)
from mu_fast.data.sports import MCQ_CHOICES

# authors_repo.md §1.2: the first 16 prompt_ids of the gemma-7b table are the facts edited in the paper's run.
GEMMA7B_FIRST_16 = [0, 5, 7, 17, 22, 52, 54, 56, 77, 84, 86, 97, 104, 116, 139, 152]
FILES = {"gemma-7b": "counterfact_google_gemma-7b.csv", "gemma-2-9b": "counterfact_google_gemma-2-9b.csv"}
_OPTION = re.compile(r"\n([ABCD])\. (.*)")


@pytest.fixture(scope="module")
def raw(data_dir):
    return {m: pd.read_csv(data_dir / f) for m, f in FILES.items()}


@pytest.fixture(scope="module")
def questions(data_dir):
    mc = pd.read_parquet(data_dir / "counterfact_mc_questions.parquet")
    return {int(r.prompt_id): r for r in mc.itertuples(index=False)}


@pytest.fixture(scope="module")
def task7(data_dir):
    return load_counterfact_task("gemma-7b", "first_16_unsplit", data_dir=data_dir)


# ------------------------------------------------------------------- filtering
@pytest.mark.parametrize("model, rows", [("gemma-7b", 2189), ("gemma-2-9b", 2250)])
def test_filtered_counts_and_pool(model, rows, raw, data_dir):
    table = raw[model]
    assert len(table) == rows  # authors_repo.md §1.2; the committed tables are already filtered
    kept = table[table["prob_of_correct_answer"] >= 0.5]
    task = load_counterfact_task(model, "first_64_unsplit", data_dir=data_dir)
    assert task.meta["n_facts"] == len(kept) - 64
    assert task.meta["few_shot_prompt_ids"] == kept["prompt_id"].tolist()[-64:]
    used = [task.forget_train, task.maintain_train, task.maintain_test]
    used_ids = {i for ps in used for i in ps.fact_ids}
    assert max(used_ids) == len(kept) - 65
    ids = kept["prompt_id"].tolist()
    assert not {ids[i] for i in used_ids} & set(task.meta["few_shot_prompt_ids"])
    maintain = list(range(64, len(kept) - 64))
    k = int(0.8 * len(maintain))
    assert task.meta["maintain_train_rows"] == maintain[:k] and task.meta["maintain_test_rows"] == maintain[k:]


def test_first_16_prompt_ids(task7, raw):
    assert task7.meta["forget_prompt_ids"] == GEMMA7B_FIRST_16
    table = raw["gemma-7b"]
    assert list(task7.forget_train.prompts) == table["prompt"].tolist()[:16]
    assert list(task7.forget_train.answers) == table["target_true"].tolist()[:16]
    assert list(task7.forget_train.edit_answers) == table["target_false"].tolist()[:16]
    assert list(task7.forget_train.subjects) == [s.strip() for s in table["subject"].tolist()[:16]]
    assert list(task7.forget_test.prompts) == list(task7.forget_train.prompts)


def test_filter_drops_low_probability_rows_before_the_pool(raw):
    table = raw["gemma-2-9b"].copy()
    rng = np.random.default_rng(0)
    low = rng.choice(len(table), size=100, replace=False)
    table.loc[low, "prob_of_correct_answer"] = 0.49
    facts, pool = split_counterfact_table(table)
    kept = table.drop(index=low)
    assert facts["prompt_id"].tolist() == kept["prompt_id"].tolist()[:-64]
    assert pool["prompt_id"].tolist() == kept["prompt_id"].tolist()[-64:]
    assert list(facts.index) == list(range(len(facts)))


def test_table_argument_and_split_halves(raw, data_dir):
    task = load_counterfact_task("my-llama", "first_64_split", table=raw["gemma-7b"], data_dir=data_dir)
    assert task.meta["forget_train_rows"] == list(range(32)) and task.meta["forget_test_rows"] == list(range(32, 64))
    ref = load_counterfact_task("gemma-7b", "first_64_split", data_dir=data_dir)
    assert list(task.maintain_test.prompts) == list(ref.maintain_test.prompts)


def test_random_split_is_the_papers_randperm(raw, data_dir):
    task = load_counterfact_task("gemma-2-9b", "random_16_unsplit", data_dir=data_dir)
    with torch.random.fork_rng():
        torch.manual_seed(16)
        expected = torch.randperm(task.meta["n_facts"])[:16].tolist()
    assert task.meta["forget_train_rows"] == expected
    assert not set(expected) & set(task.meta["maintain_train_rows"] + task.meta["maintain_test_rows"])


@pytest.mark.parametrize(
    "kwargs, match",
    [({"maintain_split": "unsplit"}, "only supports 'split'"), ({"forget_split": "basketball_split"}, "not recognised"),
     ({"mcq_edit_answer": "nope"}, "mcq_edit_answer='nope'")],
)
def test_bad_arguments(kwargs, match, data_dir):
    with pytest.raises(ValueError, match=match):
        load_counterfact_task("gemma-7b", data_dir=data_dir, **kwargs)


# --------------------------------------------------------------------- formats
@pytest.mark.parametrize("values", [
    ["plain", "it's", 'say "hi"', "tab\there", "nbsp\xa0x", "back\\slash", "new\nline", "ünï"],
    ["one"],
    [],
])
def test_parse_numpy_repr(values):
    cell = str(np.array(values, dtype=object if not values else None))
    assert parse_prompt_list(cell) == values
    assert parse_prompt_list(repr(values)) == values
    assert parse_prompt_list(values) == values


def test_parse_rejects_garbage():
    for bad in ["['a' b]", "['a'", "nothing"]:
        with pytest.raises(ValueError, match="cannot parse"):
            parse_prompt_list(bad)


def test_paraphrase_and_neighborhood(task7, raw):
    table = raw["gemma-7b"]
    for fmt, per_fact in [("paraphrase", 2), ("neighborhood", 10)]:
        for role, rows in [("forget", task7.meta["forget_test_rows"]), ("maintain", task7.meta["maintain_test_rows"])]:
            ps = task7.formats[fmt][role]
            assert len(ps) == per_fact * len(rows)
            assert list(ps.fact_ids) == [r for r in rows for _ in range(per_fact)]
            assert ps.label_token == "first" and ps.choices is None
            assert list(ps.answers) == [table["target_true"][r] for r in ps.fact_ids]
            assert list(ps.edit_answers) == [table["target_false"][r] for r in ps.fact_ids]
            assert (ps.subjects is None) == (fmt == "neighborhood")
    para = task7.formats["paraphrase"]["forget"]
    assert para.prompts[0].endswith("Danielle Darrieux, a native")
    assert all(s in p for s, p in zip(para.subjects, para.prompts, strict=True))
    assert task7.formats["neighborhood"]["forget"].prompts[0] == "The mother tongue of Léon Blum is"


def _options(prompt):
    return dict(_OPTION.findall(prompt.rsplit("Help me answer", 1)[-1]))


def test_mcq_join_answers_and_shots(task7, questions, raw):
    table = raw["gemma-7b"]
    ps = task7.formats["mcq"]["forget"]
    missing = [p for p in GEMMA7B_FIRST_16 if p not in questions]
    assert missing and task7.meta["mcq_dropped_prompt_ids"][: len(missing)] == missing
    assert len(ps) == 16 - len(missing) and ps.label_token == "last" and tuple(ps.choices) == MCQ_CHOICES
    for prompt, answer, edit, row in zip(ps.prompts, ps.answers, ps.edit_answers, ps.fact_ids, strict=True):
        q = questions[int(table["prompt_id"][row])]
        assert prompt.count("Help me answer the following multiple choice question") == 9  # 8 shots + the question
        assert f"\n\n{q.question}\n\nA. " in prompt.rsplit("Help me answer", 1)[1]
        options = _options(prompt)
        assert sorted(options.values()) == sorted([q.target_true, *q.targets_false])
        assert options[answer.strip()] == q.target_true
        assert options[edit.strip()] == q.targets_false[0]
        assert prompt.endswith("Please respond with the letter of the correct answer, A, B, C, or D. Answer:")
    shots = ps.prompts[0].split("Help me answer")[1:-1]
    pool = [questions[p] for p in task7.meta["few_shot_prompt_ids"] if p in questions][:8]
    for shot, q in zip(shots, pool, strict=True):
        letter = shot.rsplit("Answer: ", 1)[1].strip()
        assert _options(shot)[letter] == q.target_true and q.question in shot
    header = MCQ_TEMPLATE.split("{question}")[0]
    assert ps.prompts[0].startswith(header)


def test_mcq_is_seeded_and_per_fact(data_dir):
    a = load_counterfact_task("gemma-2-9b", "first_16_unsplit", data_dir=data_dir, mcq_seed=3)
    b = load_counterfact_task("gemma-2-9b", "first_16_unsplit", data_dir=data_dir, mcq_seed=3)
    c = load_counterfact_task("gemma-2-9b", "first_16_unsplit", data_dir=data_dir, mcq_seed=4)
    wide = load_counterfact_task("gemma-2-9b", "first_64_unsplit", data_dir=data_dir, mcq_seed=3)
    assert list(a.formats["mcq"]["forget"].prompts) == list(b.formats["mcq"]["forget"].prompts)
    assert list(a.formats["mcq"]["forget"].prompts) != list(c.formats["mcq"]["forget"].prompts)
    assert list(wide.formats["mcq"]["forget"].prompts)[:16] == list(a.formats["mcq"]["forget"].prompts)
    letters = [x for ps in a.formats["mcq"].values() for x in ps.answers]
    assert set(letters) == set(MCQ_CHOICES)  # the true answer is not always in one place


def test_mcq_edit_answer_target_false(data_dir, questions, raw):
    task = load_counterfact_task("gemma-2-9b", "first_64_unsplit", data_dir=data_dir, mcq_edit_answer="target_false")
    table = raw["gemma-2-9b"]
    assert task.meta["mcq_edit_not_target_false"]
    ps = task.formats["mcq"]["maintain"]
    moved = 0
    for prompt, edit, row in zip(ps.prompts, ps.edit_answers, ps.fact_ids, strict=True):
        false = table["target_false"][row].strip()
        q = questions[int(table["prompt_id"][row])]
        expected = false if false in q.targets_false else q.targets_false[0]
        assert _options(prompt)[edit.strip()] == expected
        moved += expected != q.targets_false[0]
    assert moved > 0


def test_sequential_partitions(data_dir):
    tasks = counterfact_sequential_tasks("gemma-7b", data_dir=data_dir)
    assert [t.meta["forget_range"] for t in tasks] == ["0_16", "16_32", "32_48", "48_64"]
    for p, task in enumerate(tasks):
        assert task.meta["forget_train_rows"] == list(range(16 * p, 16 * (p + 1))) == task.meta["forget_test_rows"]
        assert min(task.meta["maintain_train_rows"]) == 64
        assert task.meta["maintain_train_rows"] == tasks[0].meta["maintain_train_rows"]
    assert tasks[0].meta["forget_prompt_ids"] == GEMMA7B_FIRST_16


# ---------------------------------------------------------------- label tokens
def trained_bpe_tokenizer(texts, vocab_size=400):
    """A small byte-level BPE with a BOS template, trained offline on the data, so many answers are
    several tokens long and only the paper's first-token rule gives the expected labels."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", tok.token_to_id("<bos>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def test_label_is_the_first_token(task7):
    sets = [task7.forget_train, task7.maintain_test, task7.formats["paraphrase"]["forget"], task7.formats["mcq"]["forget"]]
    texts = [t for ps in sets for t in list(ps.prompts) + list(ps.answers) + list(ps.edit_answers)]
    tok = trained_bpe_tokenizer(texts)
    bos = tok.bos_token_id

    def paper_first(answer):  # the paper: tokenize with BOS, take the id after it
        ids = tok(answer)["input_ids"]
        return ids[1] if ids[0] == bos else ids[0]

    multi = 0
    for ps in sets[:3]:
        tp = tokenize_prompts(tok, ps)
        assert tp.answer_ids.tolist() == [paper_first(a) for a in ps.answers]
        assert tp.edit_ids.tolist() == [paper_first(a) for a in ps.edit_answers]
        multi += sum(len(tok(a, add_special_tokens=False)["input_ids"]) > 1 for a in ps.answers)
        if ps.subjects is not None:
            for ids, a, b, s in zip(tp.input_ids, tp.subject_first, tp.subject_last, ps.subjects, strict=True):
                assert s in tok.decode(ids[int(a) : int(b) + 1])
    assert multi > 0  # the rule matters for this tokenizer
    tp = tokenize_prompts(tok, sets[3])  # MCQ letters: the paper's last token of " A".." D"
    assert tp.choice_ids.tolist() == [tok(c)["input_ids"][-1] for c in MCQ_CHOICES]
