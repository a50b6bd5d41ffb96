"""The loop every sweep worker runs (a GPU worker process, a Ray actor): hold one model, execute runs of it.

``Worker.execute(run)`` loads the run's model if it does not hold it yet (dropping the previous one), then runs it
(``ModelSession.execute``); ``Worker.execute_sequence(run)`` does the same for a sequential run and yields its
records, one per step, as they come (``ModelSession.execute_sequence``). ``run_records(worker, run)`` is either,
as an iterator: what every executor sends on, record by record. A model that fails to load fails each of its runs with the load error, without loading
again. ``process_main`` is the entry point of a worker process: it pins the process to one device through
``CUDA_VISIBLE_DEVICES`` before torch is imported, then serves runs from a queue. This module imports nothing heavy
at import time, so that the environment is set first.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any


class Worker:
    """A worker's state: the current ``ModelSession`` (or the error that stopped its model from loading)."""

    def __init__(self, device: str | None = None, setup: Callable[[], None] | None = None, threads: int | None = None):
        if setup is not None:
            setup()
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.device = device
        self.session: Any = None
        self.load_error: tuple[str, dict[str, Any]] | None = None

    def execute(self, run_data: Mapping[str, Any]) -> dict[str, Any]:
        """The record of a single run (a sequential run's records: ``execute_sequence``)."""
        from mu_fast.sweep.spec import RunConfig

        run = RunConfig.from_dict(run_data)
        failed = self._load(run)
        if failed is not None:
            return failed
        return self.session.execute(run)

    def execute_sequence(self, run_data: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
        """The records of a sequential run, one per step as each finishes (``ModelSession.execute_sequence``); a
        model that fails to load gives one failed record, for the first step to run."""
        from mu_fast.sweep.spec import RunConfig

        run = RunConfig.from_dict(run_data)
        failed = self._load(run, run.step_run(min(run.replay, run.steps - 1)))
        if failed is not None:
            yield failed
            return
        yield from self.session.execute_sequence(run)

    def execute_batch(self, run_data: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
        """The records of a batch of runs (``mu_fast.sweep.batches``), one per run as each finishes
        (``ModelSession.execute_batch``); a model that fails to load fails every run of the batch."""
        from mu_fast.sweep.spec import RunConfig

        runs = [RunConfig.from_dict(r) for r in run_data["runs"]]
        for run in runs:
            failed = self._load(run)
            if failed is not None:
                yield failed
        if self.session is not None and self.session.key == runs[0].model_key:
            yield from self.session.execute_batch(runs)

    def _load(self, run: Any, record_as: Any = None) -> dict[str, Any] | None:
        """Hold ``run``'s model (loading it if needed); None, or the failed record (of ``record_as``, default the
        run) when the model does not load."""
        from mu_fast.sweep.session import ModelSession, error_info
        from mu_fast.sweep.store import RECORD_FORMAT

        if self.session is None or self.session.key != run.model_key:
            if self.load_error is not None and self.load_error[0] == run.model_key:
                error = self.load_error[1]
            else:
                self.session = None  # free the previous model before loading the next
                self.load_error = None
                try:
                    self.session = ModelSession(run.model, self.device)
                    error = None
                except Exception as err:  # noqa: BLE001 - recorded as the run's failure
                    error = {**error_info(err), "stage": "model load"}
                    self.load_error = (run.model_key, error)
            if error is not None:
                from mu_fast.provenance import provenance_block

                target = record_as or run
                return {"format": RECORD_FORMAT, "run_id": target.run_id, "config": target.to_dict(), "status": "failed",
                        "error": error, "timings": {}, "provenance": provenance_block(model={"ref": run.model["ref"]},
                                                                                      device=self.device)}
        return None

    @property
    def model_key(self) -> str | None:
        return None if self.session is None else self.session.key


def process_main(worker_id: int, device: str, visible: str | None, tasks: Any, results: Any,
                 setup: Callable[[], None] | None, threads: int | None) -> None:
    """A worker process: ``device`` is ``cuda`` (the one GPU in ``visible``) or ``cpu``; runs arrive on ``tasks``
    (None ends), records go to ``results`` as ``(worker_id, record)``."""
    if visible is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = visible
    worker = Worker(device, setup, threads)
    results.put((worker_id, {"ready": time.time()}))
    while True:
        run_data = tasks.get()
        if run_data is None:
            return
        for record in run_records(worker, run_data):
            results.put((worker_id, record))


def run_records(worker: Any, run_data: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every record of one run as it comes: a single run's one (``worker.execute``), a sequential run's one per step
    (``worker.execute_sequence``). What every executor iterates; a run has ended after ``expected_records(run_data)``
    records or a failed one."""
    if run_data.get("kind") == "sequential":
        yield from worker.execute_sequence(run_data)
    elif run_data.get("kind") == "batch":
        yield from worker.execute_batch(run_data)
    else:
        yield worker.execute(run_data)


def expected_records(run_data: Mapping[str, Any]) -> int:
    """How many records a run sends when nothing fails: its steps left for a sequence, else 1."""
    if run_data.get("kind") == "sequential":
        return int(run_data["partitions"]) - int(run_data.get("replay", 0))
    if run_data.get("kind") == "batch":
        return len(run_data["runs"])
    return 1
