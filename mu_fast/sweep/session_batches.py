"""The batched half of ``ModelSession`` (``mu_fast.sweep.session``): runs trained together (``mu_fast.sweep.batches``),
their batched evaluations and relearning. A mixin: it reads the session's model, tokenizer, device and per-run parts
(``execute``, ``_recover``, ``_fields``, ``_close``, ``task``, ``baseline``, ``localization``)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import torch

from mu_fast.sweep.spec import RunConfig
from mu_fast.sweep.store import RECORD_FORMAT, error_info


class BatchedRuns:
    """``execute_batch`` and its parts (mixed into ``ModelSession``)."""

    def execute_batch(self, runs: list[RunConfig], batched_evaluation: bool = True,
                      batched_probe_features: bool | None = None, batched_relearn: bool | None = None
                      ) -> Iterator[dict[str, Any]]:
        """The store records of runs trained together (``mu_fast.sweep.batches``: one model, task and evaluation
        settings), one per run, yielded as each run's evaluations finish. Each run is localized as alone; then one
        ``mu_fast.edit.batched.edit_batched`` trains every run's edit over the frozen model; then the formats (MCQ
        included) of every run are scored in one batched pass without writing any run into the model
        (``mu_fast.evaluate.evaluate_task_variants``; ``batched_evaluation=False``, or an error there: per run as
        alone), and on a CUDA device so are their latent probes' features (``probe_features_variants``;
        ``batched_probe_features`` True / False forces it on / off on any device); then, per run, its variant is
        applied, the rest of its evaluations run (``evaluate_edited``: relearning, the probe fits, extras and the
        summary, as alone) and the model is restored. On a CUDA device the runs' relearning attacks are trained
        together first (``relearn_attack_variants``: K LoRA adapters over the frozen model, the same numbers as alone;
        ``batched_relearn`` True / False forces it on / off on any device, ``batched_evaluation=False`` off; an error
        there: per run; 0.98x the runs one by one on this CPU, benchmarks/bench_relearn_variants.py, so per run on a
        CPU); elsewhere, and for the soft-prompt attack, they train on the applied variant, per run. Measured on a CPU
        (benchmarks/bench_eval_variants.py: the CI organism, K=8, AMD EPYC, 1 thread, CPU time): the formats'
        batched pass 0.64 s against 0.72 s for the runs one by one (1.12x), so it runs on every device; the probe
        features' 0.27 s against 0.26 s (0.93x; probably because their sets fill the per-run forwards already, and a
        whole-weight mask costs one GEMM per group), so on a CPU they are collected per run. No GPU number yet.
        On a GPU the runs are split into as many batched edits as ``mu_fast.memory.plan_batch`` says the device's
        memory holds, each with the groups per forward/backward it fits (``mu_fast.sweep.batches.device_plan``); a
        part of one run runs alone.
        A run whose preparation fails gets its failed record and leaves the batch; when the batched edit itself cannot
        run (a setting or parameter kind it refuses, or an error), every run is executed alone (``execute``), so a
        batch never fails runs that would succeed alone. Records are those of ``execute`` plus ``batch``:
        ``{"size", "index", "edit_seconds", "evaluate_seconds", "probe_features_seconds", "relearn_seconds"}``: the
        wall times of the batched edit, of the batched format evaluation, of the batched probe features and of the
        batched relearning (None when run per run), shared by the batch; each run's ``timings["evaluate"]`` is then
        ``evaluate_seconds`` split evenly over the batch's runs, its ``timings["relearn"]`` likewise, and its
        ``timings["probes"]`` its probe fit plus an even share of ``probe_features_seconds``."""
        from mu_fast.edit.loop import EditConfig
        from mu_fast.provenance import provenance_block

        prepared = []
        for run in runs:
            record: dict[str, Any] = {"format": RECORD_FORMAT, "run_id": run.run_id, "config": run.to_dict()}
            timings: dict[str, float] = {}
            start = time.perf_counter()
            try:
                if run.model_key != self.key:
                    raise ValueError(f"run {run.run_id} is for model {run.model['ref']}, but this session holds "
                                     f"{self.ref['ref']}")
                if self.broken:
                    raise RuntimeError(self.broken)
                t = time.perf_counter()
                torch.manual_seed(run.seed)
                task = self.task(run.task)
                timings["task"] = time.perf_counter() - t
                t = time.perf_counter()
                before = self.baseline(run, task)
                timings["before"] = time.perf_counter() - t
                t = time.perf_counter()
                loc, cached = self.localization(run, task)
                timings["localize"] = time.perf_counter() - t
                config = EditConfig(**{**run.edit, "betas": tuple(run.edit["betas"])})
                prepared.append((run, record, timings, start, task, before, loc, cached, config))
            except Exception as err:  # noqa: BLE001 - recorded; the rest of the batch goes on
                record.update(status="failed", error=error_info(err))
                yield self._close(record, timings, start, provenance_block)
        if not prepared:
            return
        from mu_fast.sweep.batches import device_plan

        # how many of them one batched edit holds on this device, and groups per forward/backward: on a GPU by
        # mu_fast.memory.plan_batch; on a CPU all, one per pass (all in one pass measured 0.71-0.89x the runs alone
        # there, one per pass 0.96-1.11x: benchmarks/bench_batched_edit.py)
        size, groups = device_plan(self.model, [p[6].mask for p in prepared], [p[8] for p in prepared], self.device)
        for lo in range(0, len(prepared), size):
            yield from self._train_together(prepared[lo:lo + size], groups, batched_evaluation, batched_probe_features,
                                            batched_relearn, provenance_block)

    def _train_together(self, prepared: list[tuple], groups: int | None, batched_evaluation: bool,
                        batched_probe_features: bool | None, batched_relearn: bool | None,
                        provenance_block: Any) -> Iterator[dict[str, Any]]:
        """``execute_batch`` after preparation, for the runs of one batched edit (``groups``: its groups_per_pass)."""
        if len(prepared) == 1:
            yield self.execute(prepared[0][0])
            return
        try:
            from mu_fast.edit.batched import edit_batched

            t = time.perf_counter()
            batch = edit_batched(self.model, self.tokenizer, prepared[0][4], [p[6].mask for p in prepared],
                                 [p[8] for p in prepared], groups_per_pass=groups)
            edit_seconds = time.perf_counter() - t
        except Exception:  # noqa: BLE001 - what the batched edit refuses or fails at runs alone, as it would
            self._recover()
            for p in prepared:
                yield self.execute(p[0])
            return
        if batched_probe_features is None:
            batched_probe_features = self.device.type == "cuda"
        evals, evaluate_seconds, features, features_seconds = (
            self._evaluate_variants(batch.deltas, prepared, batched_probe_features) if batched_evaluation
            else (None,) * 4)
        if batched_relearn is None:  # no gain on a CPU (0.98x: benchmarks/bench_relearn_variants.py)
            batched_relearn = self.device.type == "cuda"
        relearns, relearn_seconds = (self._relearn_variants(batch.deltas, prepared) if batched_evaluation
                                     and batched_relearn else (None, None))
        for index, (run, record, timings, start, task, before, loc, cached, _) in enumerate(prepared):
            try:
                timings["edit"] = batch[index].seconds
                if evals is not None:
                    timings["evaluate"] = evaluate_seconds / len(prepared)
                features_share = 0.0 if features is None else features_seconds / len(prepared)
                if relearns is not None:
                    timings["relearn"] = relearn_seconds / len(prepared)
                started = (time.perf_counter() - timings["edit"] - timings.get("evaluate", 0.0) - features_share
                           - timings.get("relearn", 0.0))
                torch.manual_seed(run.seed)
                with batch.deltas.variant(index):
                    from mu_fast.sweep.one_run import evaluate_edited

                    out = evaluate_edited(self.model, self.tokenizer, task, loc, batch[index], run.evaluations,
                                          seed=run.seed, timings=timings, started=started,
                                          evals=None if evals is None else evals[index],
                                          probe_features=None if features is None else features[index],
                                          relearn=None if relearns is None else relearns[index])
                if features is not None and "probes" in timings:
                    timings["probes"] += features_share
                record.update(self._fields(run, out, before, loc, cached))
                record["status"] = "ok"
            except Exception as err:  # noqa: BLE001
                record.update(status="failed", error=error_info(err))
                self._recover()
            if features is not None:
                features[index] = None  # K runs' features on the device: each freed once used
            record["batch"] = {"size": len(prepared), "index": index, "edit_seconds": edit_seconds,
                               "evaluate_seconds": evaluate_seconds, "probe_features_seconds": features_seconds,
                               "relearn_seconds": relearn_seconds}
            yield self._close(record, timings, start, provenance_block)

    def _evaluate_variants(self, deltas: Any, prepared: list[tuple], probe_features: bool
                           ) -> tuple[list[Any] | None, float | None, list[Any] | None, float | None]:
        """``(evaluate_task result per run, wall seconds, probe features per run, wall seconds)`` of a batch's runs,
        each in one pass over their variants (``evaluate_task_variants``, ``probe_features_variants``). A pass that
        fails, probes the runs do not evaluate, or ``probe_features`` False give ``None, None``: those evaluations
        then run per variant, as alone, so the batched form never fails a run."""
        from mu_fast.evaluate import evaluate_task_variants
        from mu_fast.evaluate.probes import probe_features_variants

        settings, task = prepared[0][0].evaluations, prepared[0][4]

        def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float | None]:
            try:
                t = time.perf_counter()
                return fn(self.model, self.tokenizer, task, deltas, *args, **kwargs), time.perf_counter() - t
            except Exception:  # noqa: BLE001 - e.g. out of memory at K x the batch: per run instead
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                return None, None

        evals = timed(evaluate_task_variants, formats=settings["formats"], batch_size=settings["batch_size"])
        probes = settings.get("probes")
        if not probe_features or probes is None or not task.classes:
            return (*evals, None, None)
        chosen = {k: v for k, v in probes.items() if k in ("position", "setting")}
        return (*evals, *timed(probe_features_variants, batch_size=settings["batch_size"], **chosen))

    def _relearn_variants(self, deltas: Any, prepared: list[tuple]) -> tuple[list[Any] | None, float | None]:
        """``(relearn_attack result per run, wall seconds)`` of a batch's runs trained together
        (``relearn_attack_variants``: K LoRA adapters, one pass per step), with the settings and seeds
        ``evaluate_edited`` gives each run alone. ``None, None`` when the runs do not relearn or the pass fails (e.g.
        out of memory at K x the batch): then each run relearns alone, so the batched form never fails a run."""
        from mu_fast.evaluate import relearn_attack_variants

        settings, task = prepared[0][0].evaluations, prepared[0][4]
        relearn = settings.get("relearn")
        if relearn is None:
            return None, None
        steps = relearn["steps"]
        if self.device.type == "cuda" and not self._adapters_fit(len(prepared), relearn.get("lora_rank", 512)):
            return None, None
        try:
            t = time.perf_counter()
            out = relearn_attack_variants(self.model, self.tokenizer, task, deltas, [p[0].seed for p in prepared],
                                          eval_batch_size=settings["batch_size"],
                                          eval_at=tuple(sorted({0, steps // 2, steps})), **relearn)
            return out, time.perf_counter() - t
        except Exception:  # noqa: BLE001 - per run instead, as alone (the model is never written by it)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            return None, None

    def _adapters_fit(self, k: int, lora_rank: int) -> bool:
        """Whether K relearning adapters (peft's all-linear LoRA at the effective rank; fp32 weights, gradients and
        two AdamW moments: 16 B per element) take at most half of the device's free memory, leaving the rest for
        the K groups' activations. At 7-9B with the paper's rank 512 one adapter is ~1.4B elements (~23 GB), so
        there the attacks run one by one rather than fail out of memory first."""
        from mu_fast.evaluate.relearn import effective_lora_rank

        rank = effective_lora_rank(self.model, lora_rank)
        head = self.model.get_output_embeddings()
        elements = sum(rank * (m.in_features + m.out_features) for m in self.model.modules()
                       if isinstance(m, torch.nn.Linear) and m is not head)
        return k * elements * 16 <= torch.cuda.mem_get_info(self.device)[0] // 2
