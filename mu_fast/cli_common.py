"""What the command-line modules share: option choices, task building, the known-facts check, model loading."""

from __future__ import annotations

from typing import Any

from mu_fast.preflight import ModelRef

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


# What `mu-fast evaluate` prints under its tables (the demo's table has its legend too: mu_fast.report).
EVALUATE_LEGEND = {
    "acc": "probability of the true answer, normalised over the answer choices (the paper's continuous accuracy)",
    "argmax": "fraction of prompts whose highest-scoring choice is the true answer",
    "edit acc": "probability of the injected (edit) answer (— without one)",
    "n": "prompts in the set",
    "split": "forget = the edited facts, maintain = facts that must not change",
    "relearned": "held-out forget accuracy after the LoRA relearning attack, by attack step (step 0: before it)",
    "probe": "latent-probe accuracy per layer boundary: true answer on the forget facts (best after the embeddings), "
             "probe quality on held-out maintain facts",
}


def evaluation_lines(results: dict[str, Any]) -> list[str]:
    """Plain lines of the relearning attack's and the latent probes' results of ``mu-fast evaluate`` (empty when
    neither ran)."""
    lines = []
    relearn = results.get("relearn")
    if relearn:
        steps = sorted(relearn["evals"], key=int)
        lines.append(f"relearning attack (LoRA rank {relearn.get('lora_rank')}, {relearn.get('steps')} steps on "
                     f"{relearn.get('n_relearn')} facts; {relearn.get('n_held_out')} held out):")
        lines.append("  " + "step".ljust(10) + "".join(f"{int(s):>8d}" for s in steps))
        for key in ("normal", "mcq", "maintain"):
            if all(key in relearn["evals"][s] for s in steps):
                label = {"normal": "forget acc", "mcq": "MCQ acc", "maintain": "maintain"}[key]
                lines.append("  " + label.ljust(10) + "".join(f"{relearn['evals'][s][key]['acc']:8.3f}" for s in steps))
    probes = results.get("latent_probes")
    if probes and probes.get("forget_acc_true"):
        true = probes["forget_acc_true"]
        best = max(range(1, len(true)), key=lambda i: true[i]) if len(true) > 1 else 0
        lines.append(f"latent probes ({probes.get('n_forget')} forget facts): true answer best {true[best]:.3f} "
                     f"(boundary {best})")
        rows = [("true", true), ("edit", probes.get("forget_acc_edit")), ("quality", probes.get("probe_acc"))]
        lines.append("  " + "boundary".ljust(10) + "".join(f"{layer:>7d}" for layer in probes["layers"]))
        for label, values in rows:
            if values:
                lines.append("  " + label.ljust(10) + "".join(f"{v:7.3f}" for v in values))
    return lines


def print_evaluation(results: dict[str, Any], title: str, caption: str) -> None:
    """``mu-fast evaluate``'s output: the accuracy per format and split, the relearning attack and the latent probes
    (when they ran), and the legend of the columns."""
    import shutil
    import textwrap

    from rich.table import Table

    table = Table(title=title, caption=caption)
    for col in ("format", "split", "acc", "argmax", "edit acc", "n"):
        table.add_column(col)
    for fmt, splits in results["formats"].items():
        for split, v in splits.items():
            edit_acc = v.get("edit_acc")
            table.add_row(fmt, split, f"{v['acc']:.3f}", f"{v['argmax_acc']:.3f}",
                          "—" if edit_acc is None else f"{edit_acc:.3f}", str(v["n"]))
    console().print(table)
    for line in evaluation_lines(results):
        print(line)
    shown = [k for k in EVALUATE_LEGEND if k not in ("relearned", "probe")
             or (k == "relearned" and results.get("relearn")) or (k == "probe" and results.get("latent_probes"))]
    text = "Columns: " + "; ".join(f"{k}: {EVALUATE_LEGEND[k]}" for k in shown)
    print("\n".join(textwrap.wrap(text, min(100, shutil.get_terminal_size((100, 24)).columns))))
