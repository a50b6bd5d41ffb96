"""Sequential editing: a fresh optimizer and schedule per partition, only that partition's mask moves, evaluation
on all partitions' facts after each, and the maintain set excluding every partition's facts."""

from __future__ import annotations

import pytest
import torch

from mu_fast.data.base import FactTask, PromptSet
from mu_fast.edit import EditConfig, sequential_edit, snapshot
from mu_fast.edit.sequential import all_facts_task
from mu_fast.masks import Mask
from mu_fast.models.sites import Component, SiteTable
from mu_fast.models.tiny import make_tiny_model
from tests._tiny_task import NAMES, SPORTS, word_tokenizer

N_PARTITIONS, PER_PARTITION = 3, 4


def partition_tasks(leak: bool = False) -> list[FactTask]:
    """CF-like partitions over the tiny names: forget = 4 names each, maintain = every other name (80/20)."""
    prompts = [f"Fact: Tiger Woods plays the sport of golf Fact: {n} plays the sport of" for n in NAMES]
    true = [SPORTS[i % 3] for i in range(len(NAMES))]
    edits = [SPORTS[(i + 1) % 3] for i in range(len(NAMES))]

    def ps(rows, name):
        return PromptSet([prompts[i] for i in rows], [true[i] for i in rows], [edits[i] for i in rows],
                         subjects=[NAMES[i] for i in rows], fact_ids=list(rows), label_token="last", name=name)

    total = N_PARTITIONS * PER_PARTITION
    rest = list(range(total - 1 if leak else total, len(NAMES)))  # leak: the last forget fact is also maintained
    cut = int(0.8 * len(rest))
    tasks = []
    for p in range(N_PARTITIONS):
        rows = list(range(p * PER_PARTITION, (p + 1) * PER_PARTITION))
        forget = ps(rows, f"p{p}/forget")
        tasks.append(FactTask(f"tiny_seq_{p}", forget, forget, ps(rest[:cut], "maintain"), ps(rest[cut:], "maintain_test"),
                              formats={"normal": {"forget": forget, "maintain": ps(rest[cut:], "maintain_test")}},
                              meta={"dataset": "counterfact", "partition": p}))
    return tasks


def test_partitions_are_edited_in_turn_with_fresh_optimizers():
    tokenizer = word_tokenizer()
    model = make_tiny_model("llama", vocab_size=len(tokenizer), num_hidden_layers=3, initializer_range=0.3)
    table = SiteTable(model)
    masks = [Mask.from_components(table, [Component("mlp", 0)]), Mask.from_components(table, [Component("mlp", 1)]),
             Mask.from_components(table, [Component("attn", 2)])]
    tasks = partition_tasks()
    config = EditConfig(steps=6, lr=2e-2, forget_coef=5.0, lm_coef=0.0, optimizer="torch")
    states = [snapshot(model)]
    own = []

    def evaluate(m, p):
        from mu_fast.evaluate import evaluate_task

        states.append(snapshot(m))
        own.append(evaluate_task(m, tokenizer, tasks[p])["normal"]["forget"])
        return {"seen_partition": p}

    before = [evaluate_task_forget(model, tokenizer, t) for t in tasks]
    records = sequential_edit(model, tokenizer, tasks, masks, config, eval_fn=evaluate, progress=False)
    assert [r["partition"] for r in records] == [0, 1, 2] and [r["eval"] for r in records] == [{"seen_partition": p} for p in range(3)]
    for p, record in enumerate(records):
        history = record["edit"]["history"]
        assert [h["step"] for h in history] == list(range(6))  # step counts restart
        assert history[0]["lr"] == pytest.approx(config.lr)      # the cosine schedule restarts (a reused one would be ~0)
        assert history[-1]["lr"] < 0.1 * config.lr
        prev, after = states[p], states[p + 1]  # snapshots before and after partition p's edit
        moved = {n for n in prev if not torch.equal(prev[n], after[n])}
        assert moved and moved <= set(masks[p]), (p, sorted(moved))
        assert not any(((prev[n] != after[n]) & ~masks[p].dense(n)).any() for n in moved)
        assert own[p]["edit_acc"] > before[p]["edit_acc"] + 0.2, (p, before[p], own[p])  # each partition gets edited


def test_default_evaluation_covers_all_facts_after_each_partition():
    tokenizer = word_tokenizer()
    model = make_tiny_model("llama", vocab_size=len(tokenizer), initializer_range=0.3)
    table = SiteTable(model)
    tasks = partition_tasks()
    records = sequential_edit(model, tokenizer, tasks, lambda p, task: Mask.from_components(table, [Component("mlp", p % 2)]),
                              EditConfig(steps=2, lr=1e-2, lm_coef=0.0, optimizer="torch"), progress=False)
    for record in records:
        ev = record["eval"]
        assert ev["normal"]["forget"]["n"] == N_PARTITIONS * PER_PARTITION
        assert ev["normal"]["maintain"]["n"] == len(tasks[0].maintain_test)
        assert [x["n"] for x in ev["per_partition"]] == [PER_PARTITION] * N_PARTITIONS
    merged = all_facts_task(tasks)
    assert merged.forget_test.fact_ids == list(range(N_PARTITIONS * PER_PARTITION))
    assert list(merged.formats["normal"]["forget"].prompts) == list(merged.forget_test.prompts)


def test_refuses_maintain_sets_holding_forget_facts_and_mismatched_masks():
    tokenizer = word_tokenizer()
    model = make_tiny_model("llama", vocab_size=len(tokenizer))
    mask = Mask.from_components(SiteTable(model), [Component("mlp", 0)])
    with pytest.raises(ValueError, match="also in the maintain set"):
        sequential_edit(model, tokenizer, partition_tasks(leak=True), [mask] * N_PARTITIONS, progress=False)
    with pytest.raises(ValueError, match="3 masks for"):
        sequential_edit(model, tokenizer, partition_tasks()[:2], [mask] * 3, progress=False)


def test_default_is_the_papers_25_steps(monkeypatch):
    import mu_fast.edit.sequential as sequential

    seen = []
    monkeypatch.setattr(sequential, "edit", lambda m, t, task, mask, config, progress: seen.append(config) or _Result())
    tokenizer = word_tokenizer()
    model = make_tiny_model("llama", vocab_size=len(tokenizer))
    mask = Mask.from_components(SiteTable(model), [Component("mlp", 0)])
    sequential_edit(model, tokenizer, partition_tasks(), [mask] * N_PARTITIONS, eval_fn=lambda m, p: {}, progress=False)
    assert [c.steps for c in seen] == [25] * N_PARTITIONS and [c.seed for c in seen] == [0, 1, 2]


class _Result:
    history, seconds, optimizer = [], 0.0, "stub"


def evaluate_task_forget(model, tokenizer, task):
    from mu_fast.evaluate import evaluate_task

    return evaluate_task(model, tokenizer, task)["normal"]["forget"]
