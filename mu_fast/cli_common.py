"""What the command-line modules share: option choices, task building, the known-facts check, model loading."""

from __future__ import annotations

from typing import Any

from mu_fast.preflight import ModelRef

DATASETS = ("organism", "sports", "counterfact")
# `manual` needs layer lists the command line does not take.
CLI_METHODS = ("flu", "flu_attn", "atp", "ct", "atp_mlps", "ct_mlps", "random", "random_mlps", "all_mlps", "nonlocalized")
DTYPE_NAMES = ("bf16", "bfloat16", "fp16", "float16", "fp32", "float32")
ALLOW_UNKNOWN = "--allow-unknown-facts"


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
