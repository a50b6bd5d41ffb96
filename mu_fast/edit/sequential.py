"""Sequential editing (authors_repo.md §3.6, the paper's ``*_sequential`` CounterFact runs).

The forget facts come in partitions (CounterFact: facts 0–16, 16–32, 32–48, 48–64 of the first 64; build them with
``mu_fast.data.counterfact_sequential_tasks``), edited one after another on the same model. Each partition gets its
own localization (its own Mask: the paper uses the manual-layers file, AP/CT graph and parameter budget of that
range) and its own optimizer and cosine schedule, re-created for it (25 steps each by default). The maintain set
excludes the facts of *every* partition, and after each partition the model is evaluated on all facts of all
partitions (and on the maintain set).

Beyond the paper: partition p samples its maintain / LM batches with seed ``config.seed + p`` (the authors' loaders
drew from the global generator, so each partition saw another order).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any

import torch

from mu_fast.data.base import FactTask, PromptSet
from mu_fast.edit.loop import EditConfig, edit
from mu_fast.masks import Mask

SEQUENTIAL_STEPS = 25

MaskSource = Sequence[Mask] | Callable[[int, FactTask], Mask]


def concat_prompt_sets(sets: Sequence[PromptSet], name: str) -> PromptSet:
    """One PromptSet holding every prompt of ``sets`` in order (same choices and label rule required)."""
    if not sets:
        raise ValueError(f"cannot concatenate zero prompt sets into {name!r}")
    first = sets[0]
    for s in sets[1:]:
        if s.label_token != first.label_token or list(s.choices or []) != list(first.choices or []):
            raise ValueError(f"prompt sets {first.name!r} and {s.name!r} differ in label_token or choices; "
                             "partitions of one sequential edit must share the dataset's format")

    def joined(field: str) -> list[Any] | None:
        values = [getattr(s, field) for s in sets]
        return None if any(v is None for v in values) else [x for v in values for x in v]

    return PromptSet(prompts=joined("prompts"), answers=joined("answers"), edit_answers=joined("edit_answers"),
                     choices=first.choices, subjects=joined("subjects"), fact_ids=joined("fact_ids"),
                     label_token=first.label_token, name=name)


def all_facts_task(tasks: Sequence[FactTask]) -> FactTask:
    """A FactTask whose forget sets hold every partition's facts (each format's ``forget`` set concatenated over
    partitions) and whose maintain sets are the partitions' shared ones."""
    check_partitions(tasks)
    base = tasks[0]
    formats: dict[str, dict[str, PromptSet]] = {}
    for fmt, splits in base.formats.items():
        formats[fmt] = dict(splits)
        if "forget" in splits and all("forget" in t.formats.get(fmt, {}) for t in tasks):
            formats[fmt]["forget"] = concat_prompt_sets([t.formats[fmt]["forget"] for t in tasks], f"all_partitions/{fmt}")
    return FactTask(
        name=f"{base.name}:all_partitions",
        forget_train=concat_prompt_sets([t.forget_train for t in tasks], "all_partitions/forget_train"),
        forget_test=concat_prompt_sets([t.forget_test for t in tasks], "all_partitions/forget_test"),
        maintain_train=base.maintain_train, maintain_test=base.maintain_test, formats=formats,
        lm_texts=list(base.lm_texts), unlearn=base.unlearn, classes=base.classes,
        meta={**base.meta, "partitions": [t.name for t in tasks]},
    )


def check_partitions(tasks: Sequence[FactTask]) -> None:
    """Raise ValueError unless every partition has the same maintain sets and none of them holds a forget fact of
    any partition (the paper's maintain excludes all partitions' facts)."""
    if not tasks:
        raise ValueError("no partitions given; pass one FactTask per partition (e.g. counterfact_sequential_tasks())")
    base = tasks[0]
    maintain = set(base.maintain_train.prompts) | set(base.maintain_test.prompts)
    for p, task in enumerate(tasks):
        if list(task.maintain_train.prompts) != list(base.maintain_train.prompts) or \
                list(task.maintain_test.prompts) != list(base.maintain_test.prompts):
            raise ValueError(f"partition {p} ({task.name!r}) has other maintain sets than partition 0; build all partitions "
                             "with one maintain set that excludes every partition's facts (counterfact_sequential_tasks)")
        leaked = [q for q in list(task.forget_train.prompts) + list(task.forget_test.prompts) if q in maintain]
        if leaked:
            raise ValueError(f"partition {p} ({task.name!r}): {len(leaked)} forget prompt(s) are also in the maintain set, "
                             f"e.g. {leaked[0]!r}; the maintain set must exclude the facts of all partitions")


def _mask_for(masks: MaskSource, p: int, task: FactTask) -> Mask:
    return masks(p, task) if callable(masks) else masks[p]


def sequential_edit(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks_per_partition: Sequence[FactTask],
    masks_per_partition: MaskSource,
    config: EditConfig | None = None,
    eval_fn: Callable[[torch.nn.Module, int], dict[str, Any]] | None = None,
    formats: Sequence[str] | None = ("normal",),
    progress: bool = True,
    eval_batch_size: int = 64,
) -> list[dict[str, Any]]:
    """Edit the partitions in order, in place, and evaluate on all facts after each.

    masks_per_partition: one Mask per partition, or ``f(partition_index, task) -> Mask`` called just before that
    partition's edit. config: the edit settings of every partition (default ``EditConfig(steps=25)``); the optimizer
    and its cosine schedule are built anew for each partition. eval_fn: ``f(model, partition_index) -> dict``,
    replacing the default evaluation (``evaluate_task`` of all partitions' facts in ``formats``, None = every
    format, plus the training-format accuracy of each partition's own facts).

    Returns one record per partition: ``{"partition", "task", "trainable_elements", "edit": {"history",
    "seconds", "optimizer"}, "eval": {...}}``.
    """
    return list(sequential_steps(model, tokenizer, tasks_per_partition, masks_per_partition, config, eval_fn,
                                 formats, progress, eval_batch_size))


def sequential_steps(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks_per_partition: Sequence[FactTask],
    masks_per_partition: MaskSource,
    config: EditConfig | None = None,
    eval_fn: Callable[[torch.nn.Module, int], dict[str, Any]] | None = None,
    formats: Sequence[str] | None = ("normal",),
    progress: bool = True,
    eval_batch_size: int = 64,
    replay: int = 0,
) -> Iterator[dict[str, Any]]:
    """``sequential_edit`` one partition at a time: yields each partition's record as soon as it is edited and
    evaluated (the model stays edited while the caller holds it). replay: the first ``replay`` partitions are
    edited (same masks, seeds and data order) but neither evaluated nor yielded, to resume a sequence whose first
    records are kept elsewhere: the edit draws its batches from its own seeded generator, so skipping their
    evaluations leaves the later partitions' numbers as they were."""
    tasks = list(tasks_per_partition)
    check_partitions(tasks)
    if not callable(masks_per_partition) and len(masks_per_partition) != len(tasks):
        raise ValueError(f"{len(masks_per_partition)} masks for {len(tasks)} partitions; give one Mask per partition")
    if not 0 <= replay <= len(tasks):
        raise ValueError(f"replay={replay} for {len(tasks)} partitions; replay 0..{len(tasks)} partitions")
    config = config or EditConfig(steps=SEQUENTIAL_STEPS)
    everything = all_facts_task(tasks)
    for p, task in enumerate(tasks):
        mask = _mask_for(masks_per_partition, p, task)
        result = edit(model, tokenizer, task, mask, replace(config, seed=config.seed + p), progress=progress)
        if p < replay:
            continue
        with torch.no_grad():
            evaluation = eval_fn(model, p) if eval_fn is not None else _evaluate_all(
                model, tokenizer, tasks, everything, formats, eval_batch_size)
        yield {
            "partition": p, "task": task.name, "trainable_elements": mask.param_count(),
            "edit": {"history": result.history, "seconds": result.seconds, "optimizer": result.optimizer},
            "eval": evaluation,
        }


def _evaluate_all(model: Any, tokenizer: Any, tasks: list[FactTask], everything: FactTask,
                  formats: Sequence[str] | None, batch_size: int) -> dict[str, Any]:
    from mu_fast.evaluate.formats import evaluate_task, tokenized_set
    from mu_fast.evaluate.metrics import prompt_scores, set_accuracy

    out: dict[str, Any] = evaluate_task(model, tokenizer, everything, formats=formats, batch_size=batch_size)
    out["per_partition"] = [
        set_accuracy(prompt_scores(model, tokenized_set(tokenizer, t, t.forget_test), batch_size=batch_size)) for t in tasks
    ]
    return out
