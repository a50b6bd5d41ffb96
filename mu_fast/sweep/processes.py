"""The per-GPU executor: one worker process per GPU, each pinned to its GPU by ``CUDA_VISIBLE_DEVICES``.

Workers are started with the ``spawn`` method (a fresh interpreter: CUDA cannot be shared with a forked child) and
each holds one model at a time (``mu_fast.sweep.worker``). The parent hands a worker its next run when the worker
has sent the last record of its run, and appends each record to the store as it arrives: a single run sends one, a
sequential run one per step as each step finishes (``worker.run_records``), and a failed record ends its run. A
worker that dies (killed, out of host memory, a crash in native code) fails its run in flight (a sequence: the step
in flight) with the exit code and is replaced by a fresh one on the same device.
With ``use_gpus=False`` the same machinery runs ``workers`` CPU processes (each with ``torch`` threads = cores /
workers), which is how it is tested on machines without GPUs.

Workers end with their driver (``mu_fast.worker_lifetime``): a killed driver takes its workers with it (they would
otherwise hold their models, on the GPU with ``gpus``, forever), and Ctrl-C reaches the driver alone: it terminates
its workers (a run in flight is lost; every finished run is in the store already) and ``engine.run`` raises
``SweepInterrupted``, which the command line prints as one line. Workers are as quiet as the driver: under the
command line's ``quiet_third_party`` they are too (no library FutureWarnings from each worker).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import time
import warnings
from collections.abc import Callable
from typing import Any

from mu_fast.sweep.spec import RunConfig
from mu_fast.worker_lifetime import die_with_parent, sigint_ignored

POLL_SECONDS = 1.0


def visible_gpus() -> list[int]:
    """Indices of the GPUs this process may use (after ``CUDA_VISIBLE_DEVICES``), without initializing CUDA here."""
    import torch

    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


def _visible_value(index: int) -> str:
    """The ``CUDA_VISIBLE_DEVICES`` entry of visible GPU ``index`` (respecting the parent's own list)."""
    parent = os.environ.get("CUDA_VISIBLE_DEVICES")
    if parent:
        entries = [e.strip() for e in parent.split(",") if e.strip()]
        return entries[index]
    return str(index)


def _driver_is_quiet() -> bool:
    """Whether this process runs under ``mu_fast.console.quiet_third_party`` (the command line, without --debug)."""
    from mu_fast import console

    return warnings.showwarning is console._show_warning


def _worker_entry(parent_pid: int, quiet: bool, *args: Any) -> None:
    """A worker process's first code: die with the driver, leave Ctrl-C to it, be as quiet as it; then serve runs
    (``worker.process_main(*args)``)."""
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    results = args[4]

    def stop(signum: int, frame: Any) -> None:
        # the driver's terminate(): exit through Python, so this process's multiprocessing objects are released
        # (else the resource tracker warns of leaked semaphores); a record not yet sent is dropped, not waited for
        results.cancel_join_thread()
        raise SystemExit(128 + signum)  # the shell's code for "ended by a signal", not a clean 0

    signal.signal(signal.SIGTERM, stop)
    if quiet:
        from mu_fast.console import quiet_third_party

        quiet_third_party()
    from mu_fast.sweep.worker import process_main

    process_main(*args)


class _Slot:
    def __init__(self, ctx: Any, worker_id: int, device: str, visible: str | None, results: Any,
                 setup: Callable[[], None] | None, threads: int | None):
        self.worker_id, self.device, self.visible = worker_id, device, visible
        self.tasks = ctx.Queue()
        args = (os.getpid(), _driver_is_quiet(), worker_id, device, visible, self.tasks, results, setup, threads)
        self.process = ctx.Process(target=_worker_entry, args=args, daemon=True)
        with sigint_ignored():  # the worker inherits SIGINT ignored before its interpreter starts
            self.process.start()
        self.run: RunConfig | None = None
        self.model_key: str | None = None
        self.left = 0  # records the run in flight still sends (a sequence: one per step)


def run_processes(todo: list[RunConfig], sink: Callable[[dict[str, Any]], None],
                  on_run_start: Callable[[RunConfig], None] | None = None, gpus: list[int] | None = None,
                  workers: int | None = None, use_gpus: bool = True,
                  setup: Callable[[], None] | None = None, threads: int | None = None) -> None:
    """Execute ``todo`` in worker processes; each record goes to ``sink`` (module docstring)."""
    from mu_fast.sweep.scheduler import Scheduler
    from mu_fast.sweep.session import error_info
    from mu_fast.sweep.worker import expected_records

    if use_gpus:
        available = visible_gpus()
        if not available:
            raise ValueError("executor='gpus' needs CUDA GPUs and this machine shows none; use executor='local' or "
                             "executor='processes' (CPU workers)")
        chosen = gpus if gpus is not None else available
        bad = [g for g in chosen if g not in available]
        if bad:
            raise ValueError(f"gpus={chosen}: GPU {bad[0]} is not visible (visible: {available}); pick from those")
        devices = [("cuda", _visible_value(g)) for g in chosen]
    else:
        count = workers or 2
        devices = [("cpu", None)] * count
        threads = threads or max(1, (os.cpu_count() or 1) // count)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    slots = {i: _Slot(ctx, i, dev, vis, results, setup, threads) for i, (dev, vis) in enumerate(devices)}
    scheduler = Scheduler(todo)
    busy = 0

    def hand_out(slot: _Slot) -> bool:
        run = scheduler.next_for(slot.model_key)
        if run is None:
            slot.run = None
            return False
        if on_run_start is not None:
            on_run_start(run)
        slot.run, slot.model_key = run, run.model_key
        data = run.to_dict()
        slot.left = expected_records(data)
        slot.tasks.put(data)
        return True

    finished = False
    try:
        for slot in slots.values():
            busy += hand_out(slot)
        while busy:
            try:
                worker_id, record = results.get(timeout=POLL_SECONDS)
            except queue.Empty:
                for i, slot in list(slots.items()):
                    if slot.run is not None and not slot.process.is_alive():
                        dead = RuntimeError(f"worker {i} ({slot.device} {slot.visible}) died with exit code "
                                            f"{slot.process.exitcode} while running this run")
                        lost = slot.run
                        if lost.streams:  # the step (or batch member) in flight: those before it are in the store
                            lost = lost.part(lost.parts - slot.left)
                        sink({"format": 1, "run_id": lost.run_id, "config": lost.to_dict(), "status": "failed",
                              "error": {**error_info(dead), "stage": "worker"}, "timings": {}})
                        slots[i] = _Slot(ctx, i, slot.device, slot.visible, results, setup, threads)
                        busy -= 1
                        busy += hand_out(slots[i])
                continue
            if "ready" in record:
                continue
            sink(record)
            slot = slots[worker_id]
            slot.left -= 1
            if slot.left > 0 and (record.get("status") == "ok" or not slot.run.ends_on_failure):
                continue  # a sequence's step or a batch's run: the unit's next records follow from the same worker
            busy -= 1
            busy += hand_out(slot)
        finished = True
    finally:
        with sigint_ignored():  # a second Ctrl-C does not interrupt the clean-up
            _stop(list(slots.values()), results, graceful=finished)


def _stop(slots: list[_Slot], results: Any, graceful: bool) -> None:
    """End the workers: idle ones are asked to return (``graceful``, after the last run); otherwise (Ctrl-C, an
    error in the driver) they are terminated at once, their runs in flight lost."""
    if graceful:
        for slot in slots:
            if slot.process.is_alive():
                slot.tasks.put(None)
        deadline = time.time() + 30
        for slot in slots:
            slot.process.join(timeout=max(0.0, deadline - time.time()))
    for slot in slots:
        if slot.process.is_alive():
            slot.process.terminate()
    for slot in slots:
        slot.process.join(timeout=5)
        if slot.process.is_alive():
            slot.process.kill()
            slot.process.join(timeout=5)
        slot.tasks.cancel_join_thread()  # nothing left to deliver to a worker that is gone
        slot.tasks.close()
    results.close()
