"""Value checks of a sweep spec: ranges of EditConfig fields, duplicates, evaluation formats against the datasets.

Errors are ``ValueError("spec: <key>: <problem>; <fix>")`` (``mu_fast.sweep.refs.spec_error``). Duplicates are errors
alike in every list of a spec (``check_unique``; decided in ``mu_fast.sweep.spec``'s docstring).
"""

from __future__ import annotations

import math
from typing import Any

from mu_fast.sweep.refs import close_hint, spec_error


def check_unique(where: str, values: list[Any], show: Any = repr) -> None:
    """A ``ValueError`` naming the first value listed twice."""
    seen: list[Any] = []
    for value in values:
        if value in seen:
            raise spec_error(where, f"{show(value)} is listed twice; list each value once")
        seen.append(value)


# EditConfig fields whose values have a range (the others: their type, and EditConfig's own checks).
POSITIVE_FIELDS = ("steps", "lr", "maintain_batch", "lm_batch", "lm_max_tokens", "grad_clip", "eps", "micro_batch",
                   "lm_micro_batch", "lm_chunk_tokens")
NON_NEGATIVE_FIELDS = ("forget_coef", "maintain_coef", "lm_coef", "weight_decay", "eval_every")


def edit_value_in_range(name: str, value: float, where: str) -> float:
    """``value`` of the EditConfig field ``name`` if it is finite and in the field's range, else a ``ValueError``."""
    if not math.isfinite(value):
        raise spec_error(where, f"{name} must be a finite number; got {value!r}")
    if name in POSITIVE_FIELDS and value <= 0:
        raise spec_error(where, f"{name} must be positive; got {value!r} (e.g. {name}: {_example(name)})")
    if name in NON_NEGATIVE_FIELDS and value < 0:
        raise spec_error(where, f"{name} must be >= 0; got {value!r} (e.g. {name}: {_example(name)})")
    return value


def _example(name: str) -> Any:
    from mu_fast.edit.loop import EditConfig

    default = getattr(EditConfig(), name, None)
    return default if default is not None else 1


def dataset_formats(dataset: str) -> tuple[str, ...]:
    """The evaluation formats a dataset's tasks have (``normal`` first), without building a task."""
    if dataset == "organism":
        from mu_fast.organism.facts import FORMATS
    elif dataset == "sports":
        from mu_fast.data.sports import SPORTS_FORMATS as FORMATS
    else:
        from mu_fast.data.counterfact import CF_FORMATS as FORMATS
    return ("normal", *(f for f in FORMATS if f != "normal"))


def check_formats(formats: list[str] | None, tasks: list[dict[str, Any]]) -> None:
    """Every format of ``evaluations.formats`` (None: all) exists in every task's dataset, and is listed once."""
    if formats is None:
        return
    check_unique("evaluations.formats", formats)
    for dataset in dict.fromkeys(t["dataset"] for t in tasks):
        if dataset == "memory":  # a provided task: its formats are checked by the caller that built it
            continue
        known = dataset_formats(dataset)
        for fmt in formats:
            if fmt not in known:
                raise spec_error("evaluations.formats", f"{fmt!r} is not a format of {dataset} tasks"
                                 f"{close_hint(fmt, known)}; {dataset} has {', '.join(known)} (or formats: all)")
