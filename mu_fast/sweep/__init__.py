"""Sweeps: many localize -> edit -> evaluate runs from one spec, one model load per model, resumable results.

    import mu_fast.sweep as sweep
    runs = sweep.expand("specs/ci_organism.yaml")          # [RunConfig], each with a stable run_id
    sweep.dry_run("specs/ci_organism.yaml")                # the runs, estimated time and memory
    result = sweep.run("specs/ci_organism.yaml", store="sweeps/ci.jsonl")   # executor="local" | "gpus" | "ray"
    records = sweep.load_results("sweeps/ci.jsonl")
    from mu_fast.sweep import report; print(report.format_table(records))

Modules: ``spec`` (format, validation, expansion, run ids), ``refs`` (models and tasks of a spec), ``checks`` (value
ranges, duplicates, formats), ``presets`` (named edit settings), ``evaluations`` (what runs after each edit;
``register_evaluation``), ``store`` (the JSON-lines results file), ``snapshot`` (restoring only the masked
elements), ``session`` (one loaded model, one run), ``worker`` (a worker holding one model), ``engine`` (``run``,
the local executor), ``scheduler`` (which run a free worker takes next), ``processes`` (one worker per GPU),
``ray_executor`` (Ray actors; starting a cluster), ``estimate`` (``dry_run``), ``report`` (tables and plots),
``lr_rule`` (choosing a learning rate from a sweep's records), ``protocol_evaluations`` (the paper's further
evaluations, registered at import).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_LAZY = {
    "RunConfig": "mu_fast.sweep.spec", "expand": "mu_fast.sweep.spec", "load_spec": "mu_fast.sweep.spec",
    "validate": "mu_fast.sweep.spec",
    "Store": "mu_fast.sweep.store", "load_results": "mu_fast.sweep.store",
    "run": "mu_fast.sweep.engine", "SweepResult": "mu_fast.sweep.engine",
    "dry_run": "mu_fast.sweep.estimate",
    "register_evaluation": "mu_fast.sweep.evaluations",
    "MaskedSnapshot": "mu_fast.sweep.snapshot",
    "ModelSession": "mu_fast.sweep.session",
}

__all__ = sorted([*_LAZY, "report"])


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    if name == "report":
        return import_module("mu_fast.sweep.report")
    raise AttributeError(f"module 'mu_fast.sweep' has no attribute {name!r}")
