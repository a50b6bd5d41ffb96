"""One loaded model serving many runs: the work of one run, and the caches that make the next one cheap.

``ModelSession(model_ref)`` loads the model once. ``session.execute(run)`` returns the run's store record:
localize (cached per task, method, budget and seed: the model is back in its loaded state before every run, so a
localization stays valid), snapshot the masked elements, edit, evaluate (formats, relearning, probes, registered
evaluations), restore the masked elements, summarize. Tasks (and with them their tokenizations, which
``evaluate_task`` caches on the task), tokenizer calls (``CachedTokenizer``: the edit loop re-tokenizes the LM texts
on every call), the before-edit evaluation and FLU results are cached too. Any exception is
caught and becomes a ``failed`` record (type, message, traceback excerpt); then the model is checked against its
fingerprint and reloaded if the failure left it changed.

The edit and the evaluations are ``mu_fast.sweep.one_run.edit_and_evaluate``; it runs on the loaded model, which is
restored from a masked snapshot afterwards. A model (and tasks) the caller already holds (``mu_fast.sweep.provided``:
the demo, ``mu-fast run``, ``compare_localizations``) is used instead of loading one; it cannot be reloaded, so a
failed run that left it changed fails the session's later runs with that reason.

A sequential run (``kind: sequential``, ``mu_fast.sweep.spec``) is ``session.execute_sequence(run)``: a generator of
one record per partition step, yielded as each step finishes: the partitions' masks
(``mu_fast.paper_protocol.paper_sequential_masks``) and one masked snapshot over their union, then
``mu_fast.edit.sequential.sequential_steps`` (replaying, edit only, the steps a resumed sequence has recorded), the
final evaluations after the last partition (``mu_fast.sweep.sequence``), and the restore.
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from mu_fast.sweep.one_run import check_finite as _check_finite  # noqa: F401 (the per-run body's check, importable here)
from mu_fast.sweep.snapshot import MaskedSnapshot, fingerprint
from mu_fast.sweep.spec import BUDGET_METHODS, RunConfig, paper_model_of
from mu_fast.sweep.store import RECORD_FORMAT

TRACEBACK_CHARS = 4000


def _key(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def load_sweep_model(ref: Mapping[str, Any], device: str | None = None) -> tuple[Any, Any, dict[str, Any]]:
    """``(model, tokenizer, info)`` for a resolved model reference (``refs.resolve_model``), in eval mode, on
    ``device`` (default: the first visible GPU, else the CPU)."""
    from mu_fast.models.loading import load_model

    from mu_fast.sweep.provided import model_for

    held = model_for(ref)
    if held is not None:  # the caller's own model (mu_fast.sweep.provided): used as it is, where it is
        model, tokenizer, info = held
        for p in model.parameters():
            p.requires_grad_(False)
        return model.eval(), tokenizer if isinstance(tokenizer, CachedTokenizer) else CachedTokenizer(tokenizer), info
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    kind = ref["kind"]
    if kind == "memory":
        raise RuntimeError(f"{ref['ref']} is a model held in memory by the process that started the sweep "
                           "(mu_fast.sweep.provided); run it through that process's API (compare_localizations), "
                           "not from a spec")
    if kind == "organism":
        model, tokenizer, info = load_model(ref["ref"], dtype=ref["dtype"], progress=False)  # fp32, or fp64 (demo)
        model = model.to(device)
        org = info["organism"]
        if org.config.config_hash() != ref["organism_hash"]:
            raise RuntimeError(f"{ref['ref']} loaded organism {org.config.config_hash()}, but the run was planned for "
                               f"{ref['organism_hash']}; the organism presets changed: expand the spec again")
    elif kind == "random":
        from transformers import AutoTokenizer

        from mu_fast.models.loading import parse_dtype
        from mu_fast.models.random_model import build_random_model

        model = build_random_model(ref["ref"].split(":", 1)[1], device=device, dtype=parse_dtype(ref["dtype"]),
                                   layers=ref.get("layers"))
        tokenizer = AutoTokenizer.from_pretrained(ref["tokenizer"])
        info = {"model": ref["ref"], "dtype": ref["dtype"]}
    else:
        model, tokenizer, info = load_model(ref["ref"], dtype=ref["dtype"], progress=False)
        if not hasattr(model, "hf_device_map"):
            model = model.to(device)
        if ref.get("tokenizer"):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(ref["tokenizer"])
    if tokenizer is not None and tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # as the paper's code (pad = EOS)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), CachedTokenizer(tokenizer), info


def build_task(ref: Mapping[str, Any], info: Mapping[str, Any], tokenizer: Any) -> Any:
    """The FactTask of a resolved task reference (``refs.resolve_tasks``), or the one provided for it."""
    from mu_fast.sweep.provided import task_for

    held = task_for(ref)
    if held is not None:
        return held
    if ref["dataset"] == "memory":
        raise RuntimeError(f"task {ref['name']} ({ref['digest']}) is held in memory by the process that started the "
                           "sweep (mu_fast.sweep.provided); it cannot be built from its reference")
    texts = None
    if ref.get("lm_texts"):
        from mu_fast.data import load_lm_texts

        texts = load_lm_texts(ref["lm_texts"], n=2048, seed=0)
    if ref["dataset"] == "organism":
        from mu_fast.organism import organism_task

        return organism_task(info["organism"].facts, forget_split=ref["forget_split"], inject_label=ref["inject_label"],
                             maintain_split=ref["maintain_split"], tokenizer=tokenizer)
    if ref["dataset"] == "sports":
        from mu_fast.data import load_sports_task

        return load_sports_task(forget_split=ref["forget_split"], inject_label=ref["inject_label"],
                                maintain_split=ref["maintain_split"], lm_texts=texts)
    from mu_fast.data import load_counterfact_task

    return load_counterfact_task(model=ref["cf_model"], forget_split=ref["forget_split"],
                                 maintain_split=ref["maintain_split"], lm_texts=texts)


def _paper_forget_range(run: RunConfig) -> str:
    """The paper's files' fact range of a run's forget split: ``first_64_unsplit`` -> ``0_64``, else ``0_16``."""
    split = run.task["forget_split"]
    return f"0_{split.split('_')[1]}" if split.startswith("first_") else "0_16"


class CachedTokenizer:
    """A tokenizer whose calls are memoized: the edit loop and the relearning attack tokenize the task's LM texts
    and prompts again on every call (``mu_fast.edit.loop.edit`` one text at a time), which on the organism cost
    about a fifth of a short run. Calls with hashable arguments return the first call's result (callers copy what
    they keep: slices and ``list(...)``); everything else passes through to the wrapped tokenizer."""

    def __init__(self, tokenizer: Any, max_entries: int = 200_000):
        self.__dict__["_tokenizer"] = tokenizer
        self.__dict__["_cache"] = {}
        self.__dict__["_max"] = max_entries

    def __call__(self, text: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            key = (tuple(text) if isinstance(text, list) else text, args, tuple(sorted(kwargs.items())))
            hash(key)
        except TypeError:
            return self._tokenizer(text, *args, **kwargs)
        hit = self._cache.get(key)
        if hit is None:
            hit = self._tokenizer(text, *args, **kwargs)
            if len(self._cache) < self._max:
                self._cache[key] = hit
        return hit

    def __getattr__(self, name: str) -> Any:
        tokenizer = self.__dict__.get("_tokenizer")
        if tokenizer is None:  # a copy made without __init__
            raise AttributeError(name)
        return getattr(tokenizer, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._tokenizer, name, value)

    def __len__(self) -> int:
        return len(self._tokenizer)


def error_info(err: BaseException) -> dict[str, Any]:
    """``{"type", "message", "traceback"}`` of an exception (the traceback's last ``TRACEBACK_CHARS`` characters)."""
    text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    return {"type": type(err).__name__, "message": str(err), "traceback": text[-TRACEBACK_CHARS:]}


class ModelSession:
    """A loaded model and its caches (module docstring). ``device``: where to load (default: GPU if any)."""

    def __init__(self, model_ref: Mapping[str, Any], device: str | None = None):
        from mu_fast.models.sites import SiteTable
        from mu_fast.provenance import model_identity

        self.ref = dict(model_ref)
        self.key = _key(self.ref)
        self.requested_device = device
        start = time.perf_counter()
        self.model, self.tokenizer, self.info = load_sweep_model(self.ref, device)
        self.load_seconds = time.perf_counter() - start
        self.device = self.model.get_input_embeddings().weight.device
        self.identity = model_identity(self.ref["ref"], self.info, self.model, self.ref["dtype"])
        self.identity["kind"] = self.ref["kind"]
        self.table = SiteTable(self.model)
        self.fingerprint = fingerprint(self.model)
        self.runs = 0
        self.reloads = 0
        self.broken: str | None = None
        self._tasks: dict[str, Any] = {}
        self._baselines: dict[str, dict[str, Any]] = {}
        self._flu: dict[str, Any] = {}
        self._localizations: dict[str, Any] = {}

    # ------------------------------------------------------------------ caches
    def task(self, ref: Mapping[str, Any]) -> Any:
        key = _key(ref)
        if key not in self._tasks:
            self._tasks[key] = build_task(ref, self.info, self.tokenizer)
        return self._tasks[key]

    def baseline(self, run: RunConfig, task: Any) -> dict[str, Any]:
        """The unedited model's evaluation in the run's formats: ``{"evals", "summary"}`` (once per task)."""
        from mu_fast.evaluate import evaluate_task
        from mu_fast.sweep.one_run import before_summary

        ev = run.evaluations
        key = _key([run.task, ev["formats"], ev["batch_size"]])
        if key not in self._baselines:
            evals = evaluate_task(self.model, self.tokenizer, task, formats=ev["formats"], batch_size=ev["batch_size"])
            summary = before_summary(evals)
            qa = evals.get("qa", {}).get("forget", {}).get("acc")
            if qa is not None:
                summary["qa_forget_err"] = 1.0 - float(qa)
            self._baselines[key] = {"evals": evals, "summary": summary}
        return self._baselines[key]

    def flu(self, run: RunConfig, task: Any) -> Any:
        from mu_fast.localize.flu import flu_localize

        key = _key([run.task, run.seed])
        if key not in self._flu:
            self._flu[key] = flu_localize(self.model, self.tokenizer, task, seed=run.seed)
        return self._flu[key]

    def localization(self, run: RunConfig, task: Any) -> tuple[Any, bool]:
        """``(Localization, cached)`` of the run, keyed by (model, task, method, budget, seed)."""
        key = _key([self.key, run.task, run.method, run.budget, run.seed])
        if key in self._localizations:
            return self._localizations[key], True
        if run.method.startswith("paper:"):
            loc = self._paper_localization(run)
        else:
            from mu_fast.localize import localize

            needs_flu = run.method in ("flu", "random_mlps") or (run.budget is None and run.method in BUDGET_METHODS)
            paper = paper_model_of(self.ref) if run.method == "random_mlps" else None
            if paper is not None:  # the authors drew as many random MLP layers as their FLU layers, not ours
                from types import SimpleNamespace

                from mu_fast.localize.paper_graphs import paper_flu_layers

                dataset = "counterfact" if run.task["dataset"] == "counterfact" else "sports"
                flu = SimpleNamespace(layers=paper_flu_layers(paper, dataset, _paper_forget_range(run)))
            else:
                flu = self.flu(run, task) if needs_flu else None
            loc = localize(run.method, self.model, self.tokenizer, task, budget=run.budget, flu=flu, seed=run.seed)
        self._localizations[key] = loc
        return loc, False

    def _paper_localization(self, run: RunConfig) -> Any:
        from mu_fast.localize import Localization
        from mu_fast.localize.paper_graphs import paper_localization
        from mu_fast.masks import Mask

        method = run.method.split(":", 1)[1]
        comps = paper_localization(paper_model_of(self.ref), run.task["dataset"], method, _paper_forget_range(run))
        mask = Mask.from_components(self.table, comps, meta={"method": run.method})
        return Localization(run.method, comps, mask, {}, run.budget, {})

    # ------------------------------------------------------------------ one run
    def execute(self, run: RunConfig) -> dict[str, Any]:
        """The store record of ``run`` (``ok`` or ``failed``); the model is in its loaded state afterwards."""
        from mu_fast.provenance import provenance_block

        if run.model_key != self.key:
            raise ValueError(f"run {run.run_id} is for model {run.model['ref']}, but this session holds {self.ref['ref']}")
        record: dict[str, Any] = {"format": RECORD_FORMAT, "run_id": run.run_id, "config": run.to_dict()}
        timings: dict[str, float] = {}
        start = time.perf_counter()
        try:
            if self.broken:
                raise RuntimeError(self.broken)
            record.update(self._run(run, timings))
            record["status"] = "ok"
        except Exception as err:  # noqa: BLE001 - any failure is recorded and the sweep goes on
            record.update(status="failed", error=error_info(err))
            self._recover()
        return self._close(record, timings, start, provenance_block)

    def _recover(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        try:
            unchanged = fingerprint(self.model) == self.fingerprint
        except Exception:  # noqa: BLE001 - a model that cannot even be read is reloaded
            unchanged = False
        if not unchanged:
            from mu_fast.sweep.provided import model_for

            if model_for(self.ref) is not None:  # the caller's model cannot be reloaded: no further run may use it
                self.broken = ("a failed run left the provided model changed and it cannot be reloaded; rerun: "
                               "the finished runs are in the store")
                return
            self.model, self.tokenizer, self.info = load_sweep_model(self.ref, self.requested_device)
            self._tasks.clear()  # tasks cache the tokenizer they were tokenized with
            self._baselines.clear()
            self.reloads += 1

    def _run(self, run: RunConfig, timings: dict[str, float]) -> dict[str, Any]:
        from mu_fast.edit.loop import EditConfig
        from mu_fast.sweep.one_run import edit_and_evaluate

        def lap(name: str, t0: float) -> float:
            now = time.perf_counter()
            timings[name] = now - t0
            return now

        t = time.perf_counter()
        torch.manual_seed(run.seed)
        task = self.task(run.task)
        t = lap("task", t)
        before = self.baseline(run, task)
        t = started = lap("before", t)
        loc, cached = self.localization(run, task)
        t = lap("localize", t)
        snap = MaskedSnapshot.take(self.model, loc.mask)
        lap("snapshot", t)
        config = EditConfig(**{**run.edit, "betas": tuple(run.edit["betas"])})
        try:
            out = edit_and_evaluate(self.model, self.tokenizer, task, loc, config, run.evaluations, seed=run.seed,
                                    timings=timings, started=started)
        finally:
            t0 = time.perf_counter()
            snap.restore(self.model)
            timings["restore"] = time.perf_counter() - t0
        return self._fields(run, out, before, loc, cached)

    def _fields(self, run: RunConfig, out: dict[str, Any], before: Mapping[str, Any], loc: Any,
                cached: bool) -> dict[str, Any]:
        """A finished run's record fields from ``edit_and_evaluate``'s (or ``evaluate_edited``'s) result."""
        metrics = out.pop("summary")
        edit = out.pop("edit")
        return {
            "metrics": metrics,
            "before": before["summary"],
            "results": out,
            "localization": {**loc.summary(), "cached": cached, "layer_fractions": loc.layer_fractions(self.table),
                             **({"flu_layers": list(flu.layers)} if (flu := self._flu.get(_key([run.task, run.seed])))
                                else {})},
            "edit": edit,
        }

    # ------------------------------------------------------------------ a batch (mu_fast.sweep.batches)
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

    def _close(self, record: dict[str, Any], timings: dict[str, float], start: float, provenance_block: Any
               ) -> dict[str, Any]:
        """A record's closing fields (total time, session counters, provenance); counts the run."""
        timings["total"] = time.perf_counter() - start
        record["timings"] = timings
        record["session"] = {"load_seconds": self.load_seconds, "runs_before": self.runs, "reloads": self.reloads}
        record["provenance"] = provenance_block(model=self.identity, device=self.device)
        self.runs += 1
        return record

    # ------------------------------------------------------------------ one sequence (kind: sequential)
    def sequence_tasks(self, run: RunConfig) -> tuple[list[Any], Any]:
        """``(partition tasks, all-facts task)`` of a sequential run (cached per task and partition count)."""
        key = _key(["sequential", run.task, run.partitions])
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
