"""CounterFact (Meng et al.) exactly as the paper's code uses it (reference/authors_repo.md §1.2, §4.3).

The per-model table (``counterfact_google_gemma-7b.csv`` ...; hub split ``gemma_7b`` ...) is filtered to
``prob_of_correct_answer >= 0.5``; its **last 64 rows** are the few-shot pool for the MCQ and are dropped,
then the index is reset. Rows 0..15 / 0..63 are the forget set (``random_N``: torch randperm seeded N);
maintain is every other row, 80/20 in row order (``maintain_split="unsplit"`` raises, as in the paper).
Labels are the **first** token of ``target_true``; the edit target is ``target_false``. Other formats:
``mcq`` (8-shot, options shuffled by a *seeded* rng where the paper's was unseeded; questions joined on
``prompt_id``, facts without a question dropped as the paper's inner join does), ``paraphrase`` (2 per
fact) and ``neighborhood`` (10 per fact: other subjects with the same true answer; the edit answer scores
the edit's bleed-through).
"""

from __future__ import annotations

import ast
import io
import os
import random
import tokenize
from collections.abc import Sequence
from typing import Any

from mu_fast.data.base import FactTask, PromptSet
from mu_fast.data.datadir import COUNTERFACT_HF_DATASET, counterfact_file, load_hf_table, paper_model, read_table
from mu_fast.data.sports import MCQ_CHOICES, parse_forget_split, seeded_randperm, split_rows

CF_FORMATS = ("normal", "mcq", "paraphrase", "neighborhood")
CF_FORGET_SPLITS = ("first_16", "first_64", "random_16", "random_64")
MIN_PROB = 0.5
FEW_SHOT_POOL = 64
MCQ_EDIT_ANSWERS = ("paper", "target_false")
MCQ_TEMPLATE = (
    "Help me answer the following multiple choice question:\n\n{question}\n\nA. {a}\nB. {b}\nC. {c}\nD. {d}\n\n"
    "Please respond with the letter of the correct answer, A, B, C, or D. Answer:"
)
_LIST_SYNTAX = (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER)
_REQUIRED = ("prompt", "subject", "target_true", "target_false", "prob_of_correct_answer", "prompt_id")


def parse_prompt_list(value: Any) -> list[str]:
    """A list of prompts from a CSV cell: a numpy repr (``"['a' 'b'\\n 'c']"``, no commas), a Python list
    repr, or an actual list/array (the hub dataset). Escapes (``\\xa0``) and either quote style are handled."""
    if not isinstance(value, str):
        return [str(v) for v in value]
    literals = []
    try:
        for tok in tokenize.generate_tokens(io.StringIO(value).readline):
            if tok.type == tokenize.STRING:
                literals.append(tok.string)
            elif tok.type not in _LIST_SYNTAX and tok.string not in "[],":
                raise ValueError(f"unexpected text {tok.string!r}")
        # One literal_eval of the joined literals: adjacent literals would otherwise concatenate.
        out = ast.literal_eval("[" + ", ".join(literals) + "]")
    except (tokenize.TokenError, SyntaxError, ValueError) as err:
        raise ValueError(f"cannot parse the prompt list {value[:120]!r}: {err}") from err
    return [str(v) for v in out]


def load_counterfact_table(
    model: str = "gemma-2-9b", data_dir: str | os.PathLike | None = None, hf_dataset: str | None = None
) -> Any:
    """The unfiltered per-model CounterFact table: from the data directory, or from the hub when
    ``hf_dataset`` is given (e.g. ``"PhillipGuo/counterfact-with-gemma-probs"``, split by model)."""
    if hf_dataset is not None:
        return load_hf_table(hf_dataset, paper_model(model).hf_split)
    return read_table(counterfact_file(model), data_dir)


def split_counterfact_table(table: Any, min_prob: float | None = MIN_PROB, pool: int = FEW_SHOT_POOL) -> tuple[Any, Any]:
    """(facts, few_shot_pool): keep rows with ``prob_of_correct_answer >= min_prob``, take the last ``pool``
    rows as the few-shot pool, and reset both indices (the paper's order of operations)."""
    missing = [c for c in _REQUIRED if c not in table.columns]
    if missing:
        raise ValueError(f"the CounterFact table lacks the columns {missing}; it needs {list(_REQUIRED)}")
    if min_prob is not None:
        table = table[table["prob_of_correct_answer"] >= min_prob]
    if len(table) <= pool:
        raise ValueError(f"the filtered CounterFact table has {len(table)} rows, not more than the {pool}-row few-shot pool")
    return table.iloc[:-pool].reset_index(drop=True), table.iloc[-pool:].reset_index(drop=True)


def load_counterfact_task(
    model: str = "gemma-2-9b",
    forget_split: str = "first_16_unsplit",
    maintain_split: str = "split",
    data_dir: str | os.PathLike | None = None,
    mcq_seed: int = 0,
    lm_texts: Sequence[str] | None = None,
    table: Any = None,
    *,
    hf_dataset: str | None = None,
    n_mcq_shots: int = 8,
    mcq_edit_answer: str = "paper",
) -> FactTask:
    """The paper's CounterFact editing task for ``model`` (``gemma-7b``, ``gemma-2-9b``, ``llama-3-8b``).

    forget_split: ``<first_16|first_64|random_16|random_64>_<split|unsplit>``. maintain_split: ``split``.
    table: a DataFrame to use instead of the model's file (e.g. a Llama-3 table filtered by its own
    probabilities). mcq_seed: seed of the MCQ option shuffles. mcq_edit_answer: ``paper`` scores the MCQ
    edit as ``targets_false[0]`` (the paper's code; for ~5% of facts that option is not ``target_false``)
    or ``target_false`` (the option equal to ``target_false`` when it is among the options).
    """
    name, split = parse_forget_split(forget_split, CF_FORGET_SPLITS)
    facts, pool = _facts_and_pool(model, data_dir, table, hf_dataset)
    k = int(name.split("_")[1])
    if name.startswith("first_"):
        forget = list(range(k))
    else:
        forget = seeded_randperm(len(facts), k)[:k]
    forget_train, forget_test = split_rows(forget, split, 0.5)
    return _build_task(
        facts, pool, forget_train, forget_test, exclude=forget, maintain_split=maintain_split,
        name=f"counterfact:{paper_model(model).key if table is None else model}:{forget_split}",
        meta={"forget_split": forget_split, "forget_range": f"0_{k}" if name.startswith("first_") else None},
        model=model, data_dir=data_dir, mcq_seed=mcq_seed, lm_texts=lm_texts, n_mcq_shots=n_mcq_shots,
        mcq_edit_answer=mcq_edit_answer,
    )


def counterfact_sequential_tasks(
    model: str = "gemma-2-9b",
    maintain_split: str = "split",
    data_dir: str | os.PathLike | None = None,
    mcq_seed: int = 0,
    lm_texts: Sequence[str] | None = None,
    table: Any = None,
    *,
    hf_dataset: str | None = None,
    n_partitions: int = 4,
    partition_size: int = 16,
    n_mcq_shots: int = 8,
    mcq_edit_answer: str = "paper",
) -> list[FactTask]:
    """The sequential CF edit (§3.6): the first ``n_partitions × partition_size`` facts in partitions
    (0–16, 16–32, 32–48, 48–64), edited in order. Maintain excludes every partition's facts.
    ``meta["forget_range"]`` names each partition's localization files (``"16_32"``)."""
    facts, pool = _facts_and_pool(model, data_dir, table, hf_dataset)
    total = n_partitions * partition_size
    everything = list(range(total))
    tasks = []
    for p in range(n_partitions):
        lo, hi = p * partition_size, (p + 1) * partition_size
        rows = list(range(lo, hi))
        tasks.append(
            _build_task(
                facts, pool, rows, rows, exclude=everything, maintain_split=maintain_split,
                name=f"counterfact:{paper_model(model).key if table is None else model}:sequential_{lo}_{hi}",
                meta={"forget_split": f"sequential_{lo}_{hi}", "forget_range": f"{lo}_{hi}", "partition": p,
                      "all_forget_rows": everything},
                model=model, data_dir=data_dir, mcq_seed=mcq_seed, lm_texts=lm_texts, n_mcq_shots=n_mcq_shots,
                mcq_edit_answer=mcq_edit_answer,
            )
        )
    return tasks


# ------------------------------------------------------------------ building
def _facts_and_pool(model: str, data_dir: Any, table: Any, hf_dataset: str | None) -> tuple[Any, Any]:
    if table is None:
        table = load_counterfact_table(model, data_dir, hf_dataset)
    return split_counterfact_table(table)


def _build_task(
    facts: Any, pool: Any, forget_train: list[int], forget_test: list[int], *, exclude: Sequence[int],
    maintain_split: str, name: str, meta: dict[str, Any], model: str, data_dir: Any, mcq_seed: int,
    lm_texts: Sequence[str] | None, n_mcq_shots: int, mcq_edit_answer: str,
) -> FactTask:
    if maintain_split != "split":
        raise ValueError(
            f"maintain_split={maintain_split!r}: the paper's CounterFact task only supports 'split' (80/20); "
            "an unsplit maintain set would evaluate on the facts it trains on"
        )
    if mcq_edit_answer not in MCQ_EDIT_ANSWERS:
        raise ValueError(f"mcq_edit_answer={mcq_edit_answer!r}; choose one of {MCQ_EDIT_ANSWERS}")
    if len(facts) <= len(exclude):
        raise ValueError(
            f"the table has {len(facts)} facts after filtering; the forget set needs {len(exclude)} plus a maintain set"
        )
    excluded = set(exclude)
    maintain_train, maintain_test = split_rows([i for i in range(len(facts)) if i not in excluded], True, 0.8)
    rows = {
        "forget_train": forget_train, "forget_test": forget_test,
        "maintain_train": maintain_train, "maintain_test": maintain_test,
    }
    mcq = _McqBuilder(facts, pool, data_dir, mcq_seed, n_mcq_shots, mcq_edit_answer)
    formats: dict[str, dict[str, PromptSet]] = {}
    for fmt in CF_FORMATS:
        builder = mcq.prompt_set if fmt == "mcq" else (lambda r, role, fmt=fmt: _text_prompt_set(facts, r, fmt, role))
        formats[fmt] = {"forget": builder(forget_test, "forget"), "maintain": builder(maintain_test, "maintain")}
    prompt_ids = [int(p) for p in facts["prompt_id"]]
    return FactTask(
        name=name,
        forget_train=_text_prompt_set(facts, forget_train, "normal", "forget_train"),
        forget_test=_text_prompt_set(facts, forget_test, "normal", "forget_test"),
        maintain_train=_text_prompt_set(facts, maintain_train, "normal", "maintain_train"),
        maintain_test=_text_prompt_set(facts, maintain_test, "normal", "maintain_test"),
        formats=formats,
        lm_texts=list(lm_texts or []),
        unlearn=False,
        classes=None,
        meta={
            "dataset": "counterfact",
            "model": str(model),
            "maintain_split": maintain_split,
            "n_facts": len(facts),
            "few_shot_prompt_ids": [int(p) for p in pool["prompt_id"]],
            **{f"{k}_rows": v for k, v in rows.items()},
            "forget_prompt_ids": [prompt_ids[i] for i in dict.fromkeys(forget_train + forget_test)],
            "mcq_seed": mcq_seed,
            "n_mcq_shots": n_mcq_shots,
            "mcq_edit_answer": mcq_edit_answer,
            "mcq_dropped_prompt_ids": mcq.dropped,
            "mcq_edit_not_target_false": mcq.edit_mismatch,
            **meta,
        },
    )


def _text_prompt_set(facts: Any, rows: Sequence[int], fmt: str, role: str) -> PromptSet:
    """Training-format, paraphrase or neighborhood prompts of ``rows`` (first-token labels)."""
    column = "prompt" if fmt == "normal" else f"{fmt}_prompts"
    if column not in facts.columns:
        raise ValueError(f"the CounterFact table has no {column!r} column, needed for the {fmt!r} format")
    cells, true, false, subject = (facts[c].tolist() for c in (column, "target_true", "target_false", "subject"))
    prompts, answers, edits, subjects, fact_ids = [], [], [], [], []
    for i in rows:
        texts = [str(cells[i])] if fmt == "normal" else parse_prompt_list(cells[i])
        prompts += texts
        answers += [str(true[i])] * len(texts)
        edits += [str(false[i])] * len(texts)
        subjects += [str(subject[i]).strip()] * len(texts)
        fact_ids += [int(i)] * len(texts)
    # Neighborhood prompts are about other subjects; the other formats name the fact's own subject.
    return PromptSet(
        prompts=prompts, answers=answers, edit_answers=edits, choices=None,
        subjects=None if fmt == "neighborhood" else _subjects_if_present(prompts, subjects),
        fact_ids=fact_ids, label_token="first", name=f"counterfact/{role}/{fmt}",
    )


def _subjects_if_present(prompts: Sequence[str], subjects: list[str]) -> list[str] | None:
    """The subjects, or None when one is not literally in its prompt (its token span would be undefined)."""
    return subjects if all(s and s in p for p, s in zip(prompts, subjects, strict=True)) else None


def _shuffled_question(q: Any, rng: random.Random) -> tuple[str, list[str], list[int]]:
    """(prompt, options, order): options = [true, *false]; ``order[k]`` is the option shown as letter k."""
    options = [str(q.target_true), *[str(t) for t in q.targets_false]]
    if len(options) != 4:
        raise ValueError(f"the MCQ of prompt_id {q.prompt_id} has {len(options)} options; expected 4")
    order = list(range(4))
    rng.shuffle(order)
    shown = [options[j] for j in order]
    return MCQ_TEMPLATE.format(question=q.question, a=shown[0], b=shown[1], c=shown[2], d=shown[3]), options, order


class _McqBuilder:
    """The paper's MCQ format: an ``n_shots``-example block from the few-shot pool, then the question.

    Each fact's options are shuffled by its own rng seeded with ``(seed, prompt_id)``, so a fact's prompt
    does not depend on which other facts are loaded; the in-context block has its own rng.
    """

    def __init__(self, facts: Any, pool: Any, data_dir: Any, seed: int, n_shots: int, edit_rule: str):
        questions = read_table("counterfact_mc_questions.parquet", data_dir)
        self.questions = {int(r.prompt_id): r for r in questions.itertuples(index=False)}
        self.seed, self.edit_rule = int(seed), edit_rule
        self.prompt_ids = [int(p) for p in facts["prompt_id"]]
        self.false = [str(t).strip() for t in facts["target_false"]]
        self.subjects = [str(t).strip() for t in facts["subject"]]
        self.dropped: list[int] = []
        self.edit_mismatch: list[int] = []
        shots = [self.questions[int(p)] for p in pool["prompt_id"] if int(p) in self.questions][:n_shots]
        if len(shots) < n_shots:
            raise ValueError(f"n_mcq_shots={n_shots} but only {len(shots)} few-shot pool facts have MCQ questions")
        icl_rng = random.Random(self.seed * 1_000_003 - 1)
        self.prefix = ""
        for q in shots:
            text, _, order = _shuffled_question(q, icl_rng)
            self.prefix += f"{text} {'ABCD'[order.index(0)]}\n\n"

    def prompt_set(self, rows: Sequence[int], role: str) -> PromptSet:
        prompts, answers, edits, subjects, fact_ids = [], [], [], [], []
        for i in rows:
            pid = self.prompt_ids[i]
            q = self.questions.get(pid)
            if q is None:  # the paper's inner join drops facts without a question
                if pid not in self.dropped:
                    self.dropped.append(pid)
                continue
            text, options, order = _shuffled_question(q, random.Random(self.seed * 1_000_003 + pid))
            edit_option = 1  # targets_false[0], the paper's injected answer
            if options[1] != self.false[i]:
                if pid not in self.edit_mismatch:
                    self.edit_mismatch.append(pid)
                if self.edit_rule == "target_false" and self.false[i] in options[1:]:
                    edit_option = options.index(self.false[i], 1)
            prompts.append(self.prefix + text)
            answers.append(MCQ_CHOICES[order.index(0)])
            edits.append(MCQ_CHOICES[order.index(edit_option)])
            subjects.append(self.subjects[i])
            fact_ids.append(int(i))
        return PromptSet(
            prompts=prompts, answers=answers, edit_answers=edits, choices=MCQ_CHOICES,
            subjects=_subjects_if_present(prompts, subjects), fact_ids=fact_ids, label_token="last",
            name=f"counterfact/{role}/mcq",
        )


__all__ = [
    "CF_FORMATS", "COUNTERFACT_HF_DATASET", "MCQ_TEMPLATE", "counterfact_sequential_tasks", "load_counterfact_table",
    "load_counterfact_task", "parse_prompt_list", "split_counterfact_table",
]
