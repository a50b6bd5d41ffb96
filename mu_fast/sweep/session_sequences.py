"""The sequential half of ``ModelSession`` (``mu_fast.sweep.session``): a ``kind: sequential`` run, one record per
partition step. A mixin: it reads the session's model, tokenizer, device, caches and counters."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import torch

from mu_fast.sweep.snapshot import MaskedSnapshot
from mu_fast.sweep.spec import RunConfig, paper_model_of
from mu_fast.sweep.store import RECORD_FORMAT, cache_key, error_info


class SequentialRuns:
    """``execute_sequence`` and ``sequence_tasks`` (mixed into ``ModelSession``)."""

    def sequence_tasks(self, run: RunConfig) -> tuple[list[Any], Any]:
        """``(partition tasks, all-facts task)`` of a sequential run (cached per task and partition count)."""
        key = cache_key(["sequential", run.task, run.partitions])
        if key not in self._tasks:
            from mu_fast.data import counterfact_sequential_tasks
            from mu_fast.edit.sequential import all_facts_task

            ref = run.task
            texts = None
            if ref.get("lm_texts"):
                from mu_fast.data import load_lm_texts

                texts = load_lm_texts(ref["lm_texts"], n=2048, seed=0)
            size = int(ref["forget_split"].split("_")[1]) // run.partitions
            tasks = counterfact_sequential_tasks(model=ref["cf_model"], lm_texts=texts, n_partitions=run.partitions,
                                                 partition_size=size)
            self._tasks[key] = (tasks, all_facts_task(tasks))
        return self._tasks[key]

    def execute_sequence(self, run: RunConfig) -> Iterator[dict[str, Any]]:
        """The store records of a sequential run (``mu_fast.sweep.spec``: run kinds), one per step, each yielded as
        soon as its step is edited and evaluated (the model stays edited between yields).

        The first ``run.replay`` steps are replayed: edited (same masks, seeds, data order) without evaluation or
        record, as a resumed sequence needs. Each later step is edited and evaluated on every partition's facts; the
        last one then runs the final evaluations on all facts (``mu_fast.sweep.sequence.final_evaluations``) and
        its record holds them. A failure yields a ``failed`` record for the step in flight and ends the sequence.
        The model is restored (one ``MaskedSnapshot`` over the union of the partitions' masks) before the last
        record is yielded, after a failure, and when the caller stops iterating.

        Record (as a single run's where meaningful): ``format``, ``run_id`` (the step's), ``config``
        (``run.step_run(k).to_dict()``: ``step``, ``sequence_id``), ``status``, ``sequence`` (``{"id", "step",
        "steps", "replayed", "last"}``: ``replayed``, the steps this execution replayed before its first record),
        ``metrics`` (``mu_fast.sweep.sequence.step_metrics``), ``results`` (``{"evals", "per_partition"}``; the
        last step adds the final evaluations by name and ``final_evaluations`` (their names)), ``localization``
        (the step's mask: method, forget range, trainable_params), ``edit`` (optimizer, seconds, history),
        ``timings``, ``session``, ``provenance``; ``error`` when failed.
        """
        import functools

        from mu_fast.edit.loop import EditConfig
        from mu_fast.edit.sequential import sequential_steps
        from mu_fast.paper_protocol import CF_PARTITIONS, paper_sequential_masks
        from mu_fast.sweep.one_run import check_finite
        from mu_fast.provenance import provenance_block
        from mu_fast.sweep.sequence import final_evaluations, step_metrics

        if run.model_key != self.key:
            raise ValueError(f"run {run.run_id} is for model {run.model['ref']}, but this session holds {self.ref['ref']}")
        if not run.sequential or run.step is not None:
            raise ValueError(f"run {run.run_id} is not a sequence; execute() runs single runs")
        steps, replay = run.steps, run.replay
        step = replay  # the step in flight
        timings: dict[str, float] = {}
        started = time.perf_counter()
        snap = None
        runs_before = self.runs
        self.runs += 1

        def record(k: int, **fields: Any) -> dict[str, Any]:
            config = run.step_run(k)
            return {"format": RECORD_FORMAT, "run_id": config.run_id, "config": config.to_dict(),
                    "sequence": {"id": run.sequence().run_id, "step": k, "steps": steps, "replayed": replay,
                                 "last": k == steps - 1},
                    **fields,
                    "session": {"load_seconds": self.load_seconds, "runs_before": runs_before, "reloads": self.reloads},
                    "provenance": provenance_block(model=self.identity, device=self.device)}

        failure: BaseException | None = None
        try:
            torch.manual_seed(run.seed)
            tasks, everything = self.sequence_tasks(run)
            t = time.perf_counter()
            timings["task"] = t - started
            paper = paper_model_of(run.model) or run.task.get("cf_model")
            masks = paper_sequential_masks(self.model, run.method, model_key=paper, seed=run.seed)
            snap = MaskedSnapshot.take(self.model, functools.reduce(lambda a, b: a.union(b), masks))
            timings["localize"] = time.perf_counter() - t
            config = EditConfig(**{**run.edit, "betas": tuple(run.edit["betas"])})
            ev = run.evaluations
            t = time.perf_counter()
            for part in sequential_steps(self.model, self.tokenizer, tasks, masks, config, formats=ev["formats"],
                                         progress=False, eval_batch_size=ev["batch_size"], replay=replay):
                now = time.perf_counter()
                for row in part["edit"]["history"]:
                    check_finite("edit", row, row.get("step"))
                if step == replay and replay:  # the replayed edits, with this step's evaluation (not timed apart)
                    timings["replay"] = now - t - part["edit"]["seconds"]
                timings["step"] = now - t
                last = step == steps - 1
                results: dict[str, Any] = {"evals": {k: v for k, v in part["eval"].items() if k != "per_partition"},
                                           "per_partition": part["eval"]["per_partition"]}
                final = None
                if last:
                    final = final_evaluations(self.model, self.tokenizer, everything, ev, run.seed, progress=False)
                    timings["final"] = time.perf_counter() - now
                    results.update(final)
                    results["final_evaluations"] = sorted(final)
                metrics = step_metrics(part, final, time.perf_counter() - t)
                check_finite("metric", metrics)
                out = record(step, status="ok", metrics=metrics, results=results,
                             localization={"method": run.method, "forget_range": CF_PARTITIONS[step]
                                           if steps == len(CF_PARTITIONS) else None,
                                           "trainable_params": part["trainable_elements"], "task": part["task"]},
                             edit=part["edit"])
                if last:
                    t0 = time.perf_counter()
                    snap.restore(self.model)
                    snap = None
                    timings["restore"] = time.perf_counter() - t0
                timings["total"] = time.perf_counter() - started
                out["timings"] = dict(timings)
                yield out
                timings.clear()
                step += 1
                t = started = time.perf_counter()
        except Exception as err:  # noqa: BLE001 - recorded as the step's failure; the sweep goes on
            failure = err
        finally:
            if snap is not None:
                snap.restore(self.model)
        if failure is not None:
            self._recover()
            timings["total"] = time.perf_counter() - started
            yield record(min(step, steps - 1), status="failed", error=error_info(failure), timings=dict(timings))
