"""A tiny sequential CounterFact setup for the sweep's ``kind: sequential`` tests: the 4 partitions of the first 64
facts with 16 maintain facts and the Normal format only (CPU time), a word-level tiny Llama that knows every word,
and its spec. ``small_tasks`` is module-level so that worker processes can install it (``install``, the
executors' ``setup=``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

_FULL: Any = None


def _first(s: Any, n: int = 16) -> Any:
    cut = {f.name: getattr(s, f.name)[:n] for f in dataclasses.fields(s)
           if isinstance(getattr(s, f.name), list) and f.name != "choices"}
    return dataclasses.replace(s, **cut)


def small_tasks(**kwargs: Any) -> list[Any]:
    """``counterfact_sequential_tasks`` on less data (as tests/test_cli_paper.py's)."""
    return [dataclasses.replace(t, maintain_train=_first(t.maintain_train), maintain_test=_first(t.maintain_test),
                                formats={"normal": {k: v if k == "forget" else _first(v)
                                                    for k, v in t.formats["normal"].items()}})
            for t in _FULL(**kwargs)]


def install() -> None:
    """Make ``mu_fast.data.counterfact_sequential_tasks`` the small one in this process (idempotent)."""
    global _FULL
    import mu_fast.data

    if _FULL is None:
        _FULL = mu_fast.data.counterfact_sequential_tasks
    mu_fast.data.counterfact_sequential_tasks = small_tasks


def uninstall() -> None:
    import mu_fast.data

    if _FULL is not None:
        mu_fast.data.counterfact_sequential_tasks = _FULL


def checkpoint(folder: Path, layers: int) -> Path:
    from tests._tiny_task import word_checkpoint

    install()
    return word_checkpoint(folder, small_tasks(model="gemma-7b"), layers=layers)


def spec(ckpt: Path, methods: list[str], steps: int = 1, relearn: bool = False, **extra: Any) -> dict[str, Any]:
    return {"name": "seq", "kind": "sequential", "partitions": 4,
            "models": [{"name": str(ckpt), "dtype": "fp32", "paper_model": "gemma-7b"}],
            "tasks": [{"dataset": "counterfact", "forget_splits": ["first_64_unsplit"], "cf_model": "gemma-7b"}],
            "methods": methods,
            "edit": {"preset": "paper_cf:gemma-7b:forget_64_sequential", "steps": steps, "maintain_batch": 8,
                     "lm_coef": 0.0},
            "evaluations": {"formats": ["normal"], "batch_size": 64,
                            "relearn": {"steps": 2, "lora_rank": 4, "batch_size": 8} if relearn else False},
            **extra}


def gate(model: Any, tokenizer: Any, task: Any, settings: dict[str, Any], seed: int) -> dict[str, Any]:
    """A final evaluation that waits (up to 60 s) for the file ``$SEQ_TEST_GATE``: the driver writes it when it has
    received the sequence's earlier steps, which it can only do if they were sent before the sequence ended."""
    import os
    import time

    path = Path(os.environ["SEQ_TEST_GATE"])
    deadline = time.time() + 60
    while not path.exists():
        if time.time() > deadline:
            raise TimeoutError(f"{path} never appeared: the driver did not get the earlier steps' records in time")
        time.sleep(0.05)
    return {"waited_for": path.name}


def install_with_gate() -> None:
    """``install`` plus the ``gate`` evaluation (the executors' ``setup=`` in worker processes)."""
    from mu_fast.sweep.evaluations import register_evaluation

    install()
    register_evaluation("gate", gate)


def die_once(model: Any, tokenizer: Any, task: Any, settings: dict[str, Any], seed: int) -> dict[str, Any]:
    """A final evaluation whose first call (no file ``$SEQ_TEST_DIE`` yet) ends the worker process at once."""
    import os

    path = Path(os.environ["SEQ_TEST_DIE"])
    if not path.exists():
        path.touch()
        os._exit(3)
    return {"survived": True}


def install_with_die() -> None:
    from mu_fast.sweep.evaluations import register_evaluation

    install()
    register_evaluation("die_once", die_once)
