"""The end-to-end job: localize → edit → evaluate, for several localization methods and seeds, with a report.

``compare_localizations`` is the Python face of ``mu_fast.sweep.compare``: the methods × seeds become a sweep spec
that the sweep engine runs into ``out_dir/runs.jsonl`` (resumable: a rerun skips every finished run; executors
``local``, ``processes``, ``ray``), then one report from the store (mean ± std, paired intervals against FLU, the
spread of selections, results.json and plots). The per-run body is ``mu_fast.sweep.one_run.edit_and_evaluate``; the
names below stay importable from here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from mu_fast.sweep.one_run import (  # noqa: F401 (this module's interface since the first releases)
    BEFORE_ROW,
    ORGANISM_RUN_OPTIONS,
    RUN_PRESETS,
    RunOptions,
    before_summary,
    check_finite,
    edit_and_evaluate,
    summarize,
)
from mu_fast.sweep.presets import DEMO_METHODS, METHOD_GROUP  # noqa: F401


def compare_localizations(
    model: Any,
    tokenizer: Any,
    task: Any,
    methods: Sequence[str] = DEMO_METHODS,
    edit_configs: Mapping[str, Any] | None = None,
    options: RunOptions | None = None,
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
    resume: bool = True,
    title: str | None = None,
    allow_unknown_facts: bool = False,
    provenance: Mapping[str, Any] | None = None,
    identity: Mapping[str, Any] | None = None,
    task_info: Mapping[str, Any] | None = None,
    show_table: bool | None = None,
    seeds: Sequence[int] | None = None,
    extra: Mapping[str, Any] | None = None,
    workers: int = 1,
    threads: int = 1,
    executor: str | None = None,
    ray_address: str | None = None,
    model_name: str | None = None,
    model_info: Mapping[str, Any] | None = None,
    task_ref: Mapping[str, Any] | None = None,
    batch: int | str = "auto",
) -> dict[str, Any]:
    """Localize, edit and evaluate ``task`` once per method and seed through the sweep engine; return the report
    ``{"methods": {m: aggregate}, "summary": {m: means}, "summary_std": {m: stds}, "paired", "notes", "before",
    "flu", "provenance", "store", ...}`` (``mu_fast.sweep.compare``).

    seeds: every seeded step draws anew per seed (FLU's probes, AtP/CT's corruption noise, random selections, the
    edit's batch order, the relearning attack, the latent probes); default ``(options.seed,)``. edit_configs: per
    method (default ``EditConfig()``; seed 0: each run's seed sets it). out_dir: where the store, results.json and
    plots go (default: a temporary folder, removed after). resume=False: set the store aside and run all again.
    workers > 1 (or executor="processes"): worker processes with ``threads`` torch threads each; executor="ray": Ray
    actors (``ray_address``: an existing cluster). The model is left as it was. Raises ``UnknownFactsError`` before any
    run when the model does not know the facts unless ``allow_unknown_facts``. provenance: extra fields of the
    provenance block; identity: the model identity (``mu_fast.provenance.model_identity``); task_info: ``{"dataset",
    "forget_split", "inject_label"}`` for reports; extra: further fields of results.json. model_name / model_info /
    task_ref: the reference the model was loaded from (organism, a folder, a hub id) with its load info, and the task's
    spec entry, so the store's records name them (default: the model and task by digest). batch: runs trained
    together in one pass over the frozen model (``mu_fast.sweep.batches``; 1: each alone; ``auto``, the default:
    batches on a GPU, each alone on a CPU). show_table:
    print the report (default: ``progress``).
    """
    import tempfile

    from mu_fast.edit.loop import EditConfig
    from mu_fast.sweep.compare import compare, report_lines
    from mu_fast.sweep.one_run import before_summary as _before

    options = options or RunOptions()
    seeds = list(seeds) if seeds is not None else [options.seed]
    configs = {m: (edit_configs or {}).get(m) or EditConfig() for m in methods}
    executor = executor or ("processes" if workers > 1 else "local")
    temporary = tempfile.TemporaryDirectory(prefix="mu_fast_compare_") if out_dir is None else None
    try:
        results = compare(model, tokenizer, task, methods, configs, options,
                          out_dir if out_dir is not None else temporary.name, seeds, model_name=model_name,
                          model_info=model_info, task_ref=task_ref, identity=identity, provenance=provenance,
                          task_info=task_info, extra=extra, executor=executor, workers=workers, threads=threads,
                          ray_address=ray_address, fresh=not resume, progress=progress,
                          allow_unknown_facts=allow_unknown_facts, batch=batch)
    finally:
        if temporary is not None:
            temporary.cleanup()
    if progress if show_table is None else show_table:
        print(report_lines(results, title or f"{task.name}: localized editing compared",
                           before=_before(results["before"])))
    return results
