"""Runs of ``compare_localizations`` in worker processes: the demo's 2 cores do two runs at once.

Each worker (spawned, so it starts clean; the parent's environment, including the portable-kernel variables of
``mu_fast.determinism``, is inherited before torch loads there) receives the model, tokenizer and task once, runs
with one torch thread, and returns each run's record fields. A run is a pure function of the model, its seed and its
settings, so which worker ran it changes no number. Workers die with the process that started them
(``mu_fast.worker_lifetime``): a killed demo leaves no worker behind.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

_STATE: dict[str, Any] = {}


def _init(parent_pid: int, model: Any, tokenizer: Any, task: Any, threads: int, quiet: bool) -> None:
    from mu_fast.worker_lifetime import die_with_parent

    die_with_parent(parent_pid)
    import torch

    if quiet:  # as the parent command: third-party deprecation warnings stay out of the demo's output
        from mu_fast.console import quiet_third_party

        quiet_third_party()

    torch.set_num_threads(threads)
    from mu_fast.models.sites import SiteTable

    model.eval()
    _STATE.update(model=model, tokenizer=tokenizer, task=task, table=SiteTable(model))


def _run(run: Callable[..., dict[str, Any]], index: int, method: str, seed: int, config: Any, flu: Any,
         evaluations: Any) -> tuple[int, dict[str, Any]]:
    s = _STATE
    return index, run(s["model"], s["tokenizer"], s["task"], s["table"], method, seed, flu, config, evaluations)


def run_in_workers(model: Any, tokenizer: Any, task: Any, jobs: Sequence[tuple[str, int, Any, Any, Any]],
                   workers: int, threads: int = 1, *,
                   run: Callable[..., dict[str, Any]]) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(index into jobs, record fields)`` as runs finish; jobs are ``(method, seed, EditConfig, FLUResult,
    evaluations)``, each done in a worker as ``run(model, tokenizer, task, SiteTable, method, seed, flu, config,
    evaluations)`` (``mu_fast.pipeline.localize_edit_evaluate``, passed in by ``compare_localizations``: this module
    imports nothing from the pipeline; a module-level function, it reaches the workers by name). A worker's
    exception is raised here, with the run it came from."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1; got {workers}")
    context = multiprocessing.get_context("spawn")
    env_threads = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    os.environ.update({k: str(threads) for k in env_threads})  # for the workers' start-up; restored below
    try:
        quiet = os.environ.get("MU_FAST_DEBUG") != "1"
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=context, initializer=_init,
                                 initargs=(os.getpid(), model, tokenizer, task, threads, quiet)) as pool:
            futures = {pool.submit(_run, run, i, *job): job for i, job in enumerate(jobs)}
            for future in as_completed(futures):
                method, seed = futures[future][:2]
                try:
                    yield future.result()
                except Exception as err:
                    raise RuntimeError(f"{method} seed {seed} failed in a worker process: {err}") from err
    finally:
        for key, value in env_threads.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
