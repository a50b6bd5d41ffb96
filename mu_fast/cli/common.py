"""What the command modules share: option choices and help strings, task building, the known-facts check, model
loading, the ``--seeds`` / ``--methods`` lists, and ``report_run`` (``compare_localizations`` with the report lines
of ``demo`` and ``run``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from mu_fast.preflight import ModelRef, check_choice

DATASETS = ("organism", "sports", "counterfact")
# `manual` needs layer lists the command line does not take.
CLI_METHODS = ("flu", "flu_attn", "atp", "ct", "atp_mlps", "ct_mlps", "random", "random_mlps", "all_mlps", "nonlocalized")
DTYPE_NAMES = ("bf16", "bfloat16", "fp16", "float16", "fp32", "float32")
ALLOW_UNKNOWN = "--allow-unknown-facts"


def _forget_split_help() -> str:
    from mu_fast.data.counterfact import CF_FORGET_SPLITS
    from mu_fast.data.sports import FORGET_SPLIT_NAMES

    return (f"NAME_split or NAME_unsplit; NAME for organism and sports: {', '.join(FORGET_SPLIT_NAMES)}; "
            f"for counterfact: {', '.join(CF_FORGET_SPLITS)}")


# Help strings shared by the commands (the choices they list are the ones the checks accept).
MODEL_HELP = "organism, organism:ci, a local HF checkpoint folder or a hub id"
DATASET_HELP = "the facts: " + ", ".join(DATASETS) + " (organism: only with MODEL organism)"
FORGET_SPLIT_HELP = _forget_split_help()
INJECT_LABEL_HELP = "random_without_golf, random_with_golf, golf or None (unlearning); not for counterfact"
CF_MODEL_HELP = "CounterFact table (--dataset counterfact): gemma-7b, gemma-2-9b or llama-3-8b"


def dataset_task(dataset: str, forget_split: str, inject_label: str, cf_model: str | None,
                 lm_texts: str | None) -> Any:
    """The sports / CounterFact FactTask (no model needed, so it is built, and its files checked, first)."""
    texts = None
    if lm_texts:
        from mu_fast.data import load_lm_texts

        texts = load_lm_texts(lm_texts, n=2048, seed=0)
    if dataset == "sports":
        from mu_fast.data import load_sports_task

        return load_sports_task(forget_split=forget_split, inject_label=inject_label, lm_texts=texts)
    from mu_fast.data import load_counterfact_task

    return load_counterfact_task(model=cf_model, forget_split=forget_split, lm_texts=texts)


def organism_task_of(info: dict[str, Any], forget_split: str, inject_label: str, tokenizer: Any,
                     ref: ModelRef | None = None) -> Any:
    """The organism's FactTask: from the loaded organism (``info["organism"]``) or, for a saved edited organism
    (``ref.organism``), from its preset's facts (they are generated from the preset's settings)."""
    from mu_fast.organism import OrganismConfig, organism_task

    source = info.get("organism")
    if source is None and ref is not None and ref.organism:
        source = getattr(OrganismConfig, ref.organism)()
    return organism_task(source, forget_split=forget_split, inject_label=inject_label, tokenizer=tokenizer)


def identity_of(ref: ModelRef, info: dict[str, Any], model: Any, dtype: str | None = None) -> dict[str, Any]:
    """The model identity of a loaded MODEL (``mu_fast.provenance.model_identity``)."""
    from mu_fast.provenance import model_identity

    out = model_identity(model_name(ref), info, model, dtype)
    if ref.organism:
        out["edited_from"] = f"organism:{ref.organism}"
    return out


def model_name(ref: ModelRef) -> str:
    return f"organism:{ref.value}" if ref.kind == "organism" else ref.value


def require_known_facts(model: Any, tokenizer: Any, task: Any, allow: bool) -> Any:
    """Refuse (or with --allow-unknown-facts, warn about) facts the model does not know; return the report."""
    from mu_fast.evaluate.known_facts import check_known_facts

    report = check_known_facts(model, tokenizer, task)
    report.require(allow=allow, override=ALLOW_UNKNOWN)
    return report


def load_model_ref(ref: ModelRef, dtype: str) -> tuple[Any, Any, dict[str, Any]]:
    from mu_fast.models.loading import load_model

    return load_model(model_name(ref), dtype=dtype)


def console():
    from rich.console import Console

    return Console()


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``: distinct non-negative integers, at least one."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds {text!r} is not a comma-separated list of integers; pass e.g. --seeds 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"--seeds {text!r} needs distinct non-negative integers, at least one; pass e.g. --seeds 0,1,2")
    return seeds


def parse_methods(methods: str) -> list[str]:
    """``flu,atp`` -> ``["flu", "atp"]``, each checked."""
    out = [m.strip() for m in methods.split(",") if m.strip()]
    if not out:
        raise ValueError("--methods is empty; pass a comma-separated list such as flu,atp,ct")
    for method in out:
        check_choice("--methods entry", method, CLI_METHODS)
    return out


def report_run(model: Any, tokenizer: Any, task: Any, methods: list[str], configs: Mapping[str, Any], options: Any,
               out: Path, fresh: bool, title: str, identity: Mapping[str, Any], task_info: Mapping[str, Any],
               allow_unknown_facts: bool, provenance: Mapping[str, Any] | None = None,
               seeds: list[int] | None = None, extra: Mapping[str, Any] | None = None,
               workers: int = 1, threads: int = 1, executor: str | None = None, ray_address: str | None = None,
               model_name: str | None = None, model_info: Mapping[str, Any] | None = None,
               task_ref: Mapping[str, Any] | None = None, batch: int | str = "auto") -> dict[str, Any]:
    """``compare_localizations`` (a sweep into ``out/runs.jsonl``) with the command line's report lines; the LM
    retain loss is off without texts. seeds: every method over these seeds (mean ± std); extra: more fields of
    results.json (the demo's lr choice); executor / workers / threads / ray_address / batch: the sweep engine's."""
    from mu_fast.pipeline import compare_localizations

    if not task.lm_texts:
        configs = {m: replace(c, lm_coef=0.0) for m, c in configs.items()}
    results = compare_localizations(model, tokenizer, task, methods, configs, options, out_dir=out, resume=not fresh,
                                    title=title, allow_unknown_facts=allow_unknown_facts, provenance=provenance,
                                    identity=identity, task_info=task_info, seeds=seeds, extra=extra,
                                    workers=workers, threads=threads, executor=executor, ray_address=ray_address,
                                    model_name=model_name, model_info=model_info, task_ref=task_ref, batch=batch)
    screen = console()
    block = results["provenance"]
    versions = ", ".join(f"{k} {v}" for k, v in block["versions"].items() if v)
    host = block["host"]
    flu = results["flu"]
    by_seed = {tuple(v) for v in results.get("flu_by_seed", {}).values()}
    screen.print(f"FLU layers (probe gain at the subject's last token): {flu['layers']}"
                 + (" (" + ", ".join(f"seed {k}: {v}" for k, v in results["flu_by_seed"].items()
                                     if v != flu["layers"]) + ")" if len(by_seed) > 1 else "")
                 + (f"; attention the probe implicates: {flu.get('attn_layers')}" if flu.get("attn_layers") else "")
                 + (f"; attention's share of the probe's rise: {share:.2f}"
                    if (share := (flu.get("enrichment") or {}).get("attn_share")) is not None else ""))
    cpu = host.get("cpu") or {}
    where = host["processor"] + (f" ({cpu['vendor']} family {cpu['family']} model {cpu['model']})"
                                 if cpu.get("family") else "")
    screen.print(f"versions: {versions}; {host['cpu_capability']} kernels, {host['torch_threads']} torch thread(s) on "
                 f"{where} (all in results.json)", highlight=False)
    screen.print(f"report: {out}/ (runs.jsonl: the sweep store, one record per run; results.json, probe_accuracy.png, "
                 "localization_map.png, robustness.png)")
    return results


BATCH_HELP = ("runs trained together in one pass over the frozen model (mu_fast.sweep.batches): auto (batches on a GPU, "
              "sized by its memory; each alone on a CPU, where it measured no gain), a number, or 1 for each alone; "
              "the numbers equal the runs' alone to float round-off")


def parse_batch(text: str) -> int | str:
    """``--batch``: a positive integer or ``auto``."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"--batch {text!r}: give a positive number of runs to train together, or auto")
    return value
