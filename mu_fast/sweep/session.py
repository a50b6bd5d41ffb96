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
final evaluations after the last partition (``mu_fast.sweep.sequence``), and the restore
(``mu_fast.sweep.session_sequences``). Runs trained together (``mu_fast.sweep.batches``) are
``session.execute_batch(runs)`` (``mu_fast.sweep.session_batches``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch

from mu_fast.sweep.one_run import check_finite as _check_finite  # noqa: F401 (the per-run body's check, importable here)
from mu_fast.sweep.session_batches import BatchedRuns
from mu_fast.sweep.session_sequences import SequentialRuns
from mu_fast.sweep.snapshot import MaskedSnapshot, fingerprint
from mu_fast.sweep.spec import BUDGET_METHODS, RunConfig, paper_model_of
from mu_fast.sweep.store import RECORD_FORMAT, cache_key, error_info  # noqa: F401 (error_info: worker, processes)


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


class ModelSession(BatchedRuns, SequentialRuns):
    """A loaded model and its caches (module docstring). ``device``: where to load (default: GPU if any)."""

    def __init__(self, model_ref: Mapping[str, Any], device: str | None = None):
        from mu_fast.models.sites import SiteTable
        from mu_fast.provenance import model_identity

        self.ref = dict(model_ref)
        self.key = cache_key(self.ref)
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
        key = cache_key(ref)
        if key not in self._tasks:
            self._tasks[key] = build_task(ref, self.info, self.tokenizer)
        return self._tasks[key]

    def baseline(self, run: RunConfig, task: Any) -> dict[str, Any]:
        """The unedited model's evaluation in the run's formats: ``{"evals", "summary"}`` (once per task)."""
        from mu_fast.evaluate import evaluate_task
        from mu_fast.sweep.one_run import before_summary

        ev = run.evaluations
        key = cache_key([run.task, ev["formats"], ev["batch_size"]])
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

        key = cache_key([run.task, run.seed])
        if key not in self._flu:
            self._flu[key] = flu_localize(self.model, self.tokenizer, task, seed=run.seed)
        return self._flu[key]

    def localization(self, run: RunConfig, task: Any) -> tuple[Any, bool]:
        """``(Localization, cached)`` of the run, keyed by (model, task, method, budget, seed)."""
        key = cache_key([self.key, run.task, run.method, run.budget, run.seed])
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
                             **({"flu_layers": list(flu.layers)} if (flu := self._flu.get(cache_key([run.task, run.seed])))
                                else {})},
            "edit": edit,
        }

    # ------------------------------------------------------------------ a batch (mu_fast.sweep.batches)
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
