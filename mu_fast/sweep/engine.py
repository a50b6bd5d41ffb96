"""Running a sweep: skip what the store holds, group the rest by model, execute, append one record per run.

``run(spec)`` expands the spec, reads the store, and hands every run without a record (``retry_failed=True``:
also those whose latest record failed) to an executor:

* ``local`` (default): this process, one model at a time (loaded once, restored between runs).
* ``gpus``: one worker process per visible GPU (``CUDA_VISIBLE_DEVICES`` set to one GPU in each; ``gpus=[...]``
  picks them); ``processes``: ``workers`` CPU worker processes (the same machinery without GPUs).
* ``ray``: Ray actors, one GPU each when the cluster has GPUs (``mu_fast.sweep.ray_executor``).

Batches (``batch=`` / the spec's ``batch:``, default ``auto``): runs of one model, task and evaluation settings are
grouped into units of up to that many (``mu_fast.sweep.batches``) whose edits train together over the frozen model
(``mu_fast.edit.batched``); each run is then evaluated on its own variant and stored as its own record (the numbers
of the run alone to float round-off; ``tests/sweep/test_batches.py``). ``auto`` (``resolve_batch``): units of up to
``AUTO_BATCH`` runs where the runs execute on a GPU, the session then fitting as many of a unit's configurations in
one batched edit as the device's memory holds (``mu_fast.memory.plan_batch``); each run alone on a CPU, where
batching measured no gain: on this AMD EPYC (2 cores, 1 thread per worker) the organism's edit step is arithmetic
(4.1-5.2 GFLOP per step in 115-126 ms, matmuls half of it, ``benchmarks/step_anatomy.py``), and ``bench_sweep.py``
measured 0.96x the unbatched engine with one forward/backward per run, 0.78x with all runs in one pass. A number asks for batches of
that size on any device. The GPU rows are owed (benchmarks/GPU_OWED.md).

Every executor schedules the same way: a free worker takes the next run of the model it holds, else the first run
of the model with the most runs left, so each worker loads as few models as it can. Records come back to this
process, which appends them to the store (``mu_fast.sweep.store``) as they arrive: a killed sweep loses only the
runs in flight, and started again it skips every recorded run. The driver holds the store's lock for the whole sweep
(``Store.driver_lock``): a second sweep on the same store is refused at once with one line.
Ctrl-C (SIGINT) stops every executor the same way
and ``run`` raises ``SweepInterrupted``, whose message says what the store keeps and how to resume.

Sequential runs (``kind: sequential``, ``mu_fast.sweep.spec``): a run is a sequence of partition edits and writes one
record per step, each with its own run id (``RunConfig.step_run``). Every executor passes a run's records to the
store as the worker sends them (``worker.run_records``): the local executor as the session yields them, the
processes executor as each arrives on the results queue (a run ends after its expected records or a failed one),
Ray through a streaming generator (``ray_executor``); so a killed sweep loses only the step in flight. A sequence
whose steps are all recorded is skipped; one recorded up to step k-1 is handed out with ``replay=k``: the worker
replays the edits of steps 0..k-1 (no evaluation, no record; same seeds and data order, so the same weights) and
runs the rest, whose records say ``sequence.replayed``. A failed step ends its sequence (its later steps are not
run); it counts as finished unless ``retry_failed``, which resumes the sequence at that step. ``SweepResult``
counts records (``unit``: ``steps`` for a sequential spec).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mu_fast.sweep.scheduler import Scheduler
from mu_fast.sweep.spec import RunConfig, expand, load_spec
from mu_fast.sweep.store import Store

EXECUTORS = ("local", "gpus", "processes", "ray")
# batch: auto on a GPU: units of up to this many runs; the session trains as many of a unit's configurations
# together as mu_fast.memory.plan_batch fits in the device's memory (the rest in further batched edits).
AUTO_BATCH = 16
RecordCallback = Callable[[dict[str, Any]], None]
RunCallback = Callable[[RunConfig], None]


@dataclass
class SweepResult:
    """What ``run`` did: counts, the store path, the records it wrote, wall time. Counts are of records: a
    sequential run counts once per step (``unit`` is then ``steps``)."""

    store: Path
    total: int
    skipped: int
    ok: int = 0
    failed: int = 0
    seconds: float = 0.0
    records: list[dict[str, Any]] = field(default_factory=list)
    unit: str = "runs"

    def __str__(self) -> str:
        return (f"{self.total} {self.unit}: {self.skipped} already in {self.store}, {self.ok} ok, {self.failed} failed, "
                f"{self.seconds:.1f} s")


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C ended ``run``: the finished runs are in the store; the message (one line) says how to resume."""


class _Sink:
    """Appends each record to the store, counts it, and calls the caller's callback."""

    def __init__(self, store: Store, result: SweepResult, on_record: RecordCallback | None, bar: Any):
        self.store, self.result, self.on_record, self.bar = store, result, on_record, bar

    def __call__(self, record: dict[str, Any]) -> None:
        self.store.append(record)
        self.result.records.append(record)
        if record.get("status") == "ok":
            self.result.ok += 1
        else:
            self.result.failed += 1
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(ok=self.result.ok, failed=self.result.failed)
        if self.on_record is not None:
            self.on_record(record)


def store_path(spec: Mapping[str, Any], store: str | os.PathLike | None) -> Path:
    """The store: ``store``, else the spec's ``store:``, else ``sweeps/<name>.jsonl``."""
    if store is not None:
        return Path(store).expanduser()
    if spec.get("store"):
        return Path(spec["store"]).expanduser()
    return Path("sweeps") / f"{spec.get('name', 'sweep')}.jsonl"


def pending_runs(runs: list[RunConfig], store: Store, retry_failed: bool = False) -> list[RunConfig]:
    """The runs ``store`` has no finished record of (failed ones count as finished unless ``retry_failed``).

    A sequence (``kind: sequential``) is finished when each of its steps' latest record is ok, or (without
    ``retry_failed``) when the first step without an ok record has a failed one. Otherwise it is returned with
    ``replay`` = its leading ok steps: those are replayed, edit only, and the rest run."""
    if not any(r.sequential for r in runs):
        done = store.finished(include_failed=not retry_failed)
        return [r for r in runs if r.run_id not in done]
    latest = {rid: r.get("status") for rid, r in store.latest().items()}
    out = []
    for run in runs:
        if not run.sequential:
            if latest.get(run.run_id) not in (("ok",) if retry_failed else ("ok", "failed")):
                out.append(run)
            continue
        statuses = [latest.get(run.step_run(k).run_id) for k in range(run.steps)]
        ok = next((k for k, status in enumerate(statuses) if status != "ok"), run.steps)
        if ok == run.steps or (statuses[ok] == "failed" and not retry_failed):
            continue
        out.append(dataclasses.replace(run, replay=ok))
    return out


def records_left(todo: list[RunConfig]) -> int:
    """The records the pending runs ``todo`` write when nothing fails (a sequence: one per step not yet recorded)."""
    return sum(r.steps - r.replay for r in todo)


def run(
    spec: str | os.PathLike | Mapping[str, Any],
    *,
    vars: Mapping[str, Any] | None = None,
    store: str | os.PathLike | None = None,
    executor: str = "local",
    retry_failed: bool = False,
    workers: int | None = None,
    gpus: list[int] | None = None,
    ray_address: str | None = None,
    on_record: RecordCallback | None = None,
    on_run_start: RunCallback | None = None,
    progress: bool = True,
    fsync: bool = True,
    setup: Callable[[], None] | None = None,
    threads: int | None = None,
    batch: int | str | None = None,
) -> SweepResult:
    """Run every run of ``spec`` that ``store`` does not hold yet; return a ``SweepResult``.

    executor: ``local`` | ``gpus`` | ``processes`` | ``ray`` (module docstring). workers: worker count for
    ``processes`` and ``ray`` (default: 2, or the cluster's GPU count for Ray). ray_address: an existing Ray cluster
    (``"auto"``); None starts a local one. on_record(record): after each record is stored; on_run_start(run): before
    a run is handed out (the local executor calls it right before the run starts). setup: called once in every worker
    process or actor before any run (e.g. to ``register_evaluation``). threads: torch CPU threads per worker (None:
    torch's default locally, cores / workers in worker processes and CPU actors; on a busy machine 1 is often
    fastest). batch: runs trained together (``mu_fast.sweep.batches``; default the spec's ``batch:``, else ``auto``):
    up to that many runs of one model, task and evaluation settings edit in one pass over the frozen model; ``auto``:
    ``resolve_batch`` (module docstring). Each run still gets its own record. Nothing loads before the spec is checked.
    """
    if executor not in EXECUTORS:
        raise ValueError(f"executor={executor!r}; choose one of {EXECUTORS}")
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be a positive integer; got {workers!r}")
    start = time.perf_counter()
    data = load_spec(spec, vars)
    runs = expand(data)
    size = resolve_batch(batch if batch is not None else data.get("batch", "auto"), executor)
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"batch={size!r}: give a positive number of runs to train together, or auto")
    st = Store(store_path(data, store), fsync=fsync)
    lock = st.driver_lock()  # one driver per store: a second is refused (mu_fast.sweep.store)
    bar = None
    try:
        todo = pending_runs(runs, st, retry_failed)
        total, left = records_left(runs), records_left(todo)
        result = SweepResult(st.path, total, total - left, unit="steps" if any(r.sequential for r in runs) else "runs")
        if progress and todo:
            from tqdm.auto import tqdm

            bar = tqdm(total=left, desc=f"sweep {data.get('name', '')}".strip(), unit=result.unit[:-1])
        sink = _Sink(st, result, on_record, bar)
        from mu_fast.sweep.batches import group

        units = group(todo, size)
        if on_run_start is not None:
            each = on_run_start

            def on_run_start(unit: Any) -> None:  # a batch: each of its runs
                for member in getattr(unit, "runs", [unit]):
                    each(member)
        todo = units
        if not todo:
            pass
        elif executor == "local":
            _run_local(todo, sink, on_run_start, setup, threads)
        elif executor in ("gpus", "processes"):
            from mu_fast.sweep.processes import run_processes

            run_processes(todo, sink, on_run_start, gpus=gpus if executor == "gpus" else None,
                          workers=workers, use_gpus=executor == "gpus", setup=setup, threads=threads)
        else:
            from mu_fast.sweep.ray_executor import run_ray

            run_ray(todo, sink, on_run_start, workers=workers, address=ray_address, setup=setup, threads=threads)
    except KeyboardInterrupt:
        # the store, not the counts: Ctrl-C may land between them
        left = records_left(pending_runs(runs, st, retry_failed))
        unit = "steps" if any(r.sequential for r in runs) else "runs"
        raise SweepInterrupted(f"sweep interrupted: {st.path} keeps {records_left(runs) - left} of the "
                               f"{records_left(runs)} {unit}; run the same command again to run the other {left}") from None
    finally:
        if bar is not None:
            bar.close()
        lock.release()
    result.seconds = time.perf_counter() - start
    return result


def resolve_batch(batch: int | str, executor: str) -> int:
    """The unit size for ``batch``: a number as given; ``auto``: ``AUTO_BATCH`` where the runs execute on a GPU (the
    ``gpus`` executor, or ``local`` / ``ray`` on a machine with CUDA), else 1 (module docstring: no gain on a CPU)."""
    if batch != "auto":
        return batch  # type: ignore[return-value]
    if executor == "gpus":
        return AUTO_BATCH
    if executor == "processes":  # CPU worker processes
        return 1
    import torch

    return AUTO_BATCH if torch.cuda.is_available() else 1


def _run_local(todo: list[RunConfig], sink: _Sink, on_run_start: RunCallback | None,
               setup: Callable[[], None] | None, threads: int | None) -> None:
    from mu_fast.sweep.worker import Worker, run_records

    worker = Worker(None, setup, threads)
    scheduler = Scheduler(todo)
    while (run_config := scheduler.next_for(worker.model_key)) is not None:
        if on_run_start is not None:
            on_run_start(run_config)
        for record in run_records(worker, run_config.to_dict()):
            sink(record)
