"""``mu-fast evaluate``: forget / maintain accuracy of MODEL in every format, optionally the relearning attack and the
latent probes (every relearning / probe keyword is a flag, ``mu_fast.cli.options``). ``--delta`` applies a delta saved
by ``mu-fast edit`` to the full-precision model first (its base values checked); MODEL may also be a folder ``mu-fast
edit --save-model`` saved from the organism. Prints a table per format and split with the legend of its columns;
``--out`` writes the results JSON with the provenance block (``mu_fast.provenance``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from mu_fast.cli.common import (
    CF_MODEL_HELP,
    DATASET_HELP,
    DATASETS,
    DTYPE_NAMES,
    FORGET_SPLIT_HELP,
    INJECT_LABEL_HELP,
    console,
    dataset_task,
    identity_of,
    load_model_ref,
    organism_task_of,
)
from mu_fast.cli.options import check_flag_values, flag_name, probe_flags, relearn_flags, with_flags
from mu_fast.preflight import (
    check_choice,
    check_output,
    check_task_options,
    check_writable,
    resolve_model,
    writing_output,
)


@with_flags("probe_settings", probe_flags())
@with_flags("relearn_settings", relearn_flags())
def evaluate_cmd(
    model: str = typer.Argument(..., help="organism, organism:ci, a local HF checkpoint folder (also one saved by `mu-fast edit --save-model`) or a hub id"),
    delta: Path | None = typer.Option(None, help="a delta saved by `mu-fast edit`, applied to MODEL before evaluating"),
    dataset: str = typer.Option("organism", help=DATASET_HELP),
    forget_split: str = typer.Option("first_16_unsplit", help=FORGET_SPLIT_HELP),
    inject_label: str = typer.Option("random_without_golf", help=INJECT_LABEL_HELP),
    cf_model: str | None = typer.Option(None, help=CF_MODEL_HELP),
    relearn: bool = typer.Option(False, help="also run the relearning attack (settings: --relearn-*, default the paper's)"),
    probes: bool = typer.Option(False, help="also run latent-knowledge probes (settings: --probe-*)"),
    check_base: bool = typer.Option(True, help="refuse a --delta whose base values differ from MODEL's "
                                               "(--no-check-base applies it anyway)"),
    out: Path | None = typer.Option(None, help="write the results JSON here"),
    overwrite: bool = typer.Option(False, help="replace an existing --out file"),
    dtype: str = typer.Option("bf16", help="precision the model is evaluated in: bf16, fp16 or fp32 (the organism: always fp32)"),
    relearn_settings: dict[str, Any] | None = None,
    probe_settings: dict[str, Any] | None = None,
) -> None:
    """Evaluate forget / maintain accuracy in every format (and optionally relearning and probes)."""
    relearn_settings, probe_settings = dict(relearn_settings or {}), dict(probe_settings or {})
    for given, wanted, what in ((relearn_settings, relearn, "relearn"), (probe_settings, probes, "probe")):
        if given and not wanted:
            flag = "--probes" if what == "probe" else "--relearn"
            raise ValueError(f"{flag_name(next(iter(given)), what)} sets the {what} evaluation; add {flag}")
    check_flag_values(relearn_settings, "relearn")
    check_flag_values(probe_settings, "probe")
    check_choice("--dtype", dtype, DTYPE_NAMES)
    if out is not None:
        check_output("--out", [out], overwrite)
        check_writable("--out", out)
    if delta is not None and not (Path(delta) / "delta.json").is_file():
        raise FileNotFoundError(f"--delta {str(delta)!r} holds no delta.json; pass a folder saved by `mu-fast edit`")
    ref = resolve_model(model)
    check_task_options(dataset, ref, forget_split, inject_label, cf_model, DATASETS)
    task = dataset_task(dataset, forget_split, inject_label, cf_model, None) if dataset != "organism" else None
    from mu_fast.evaluate import evaluate_task, latent_probes, relearn_attack
    from mu_fast.evaluate.known_facts import check_known_facts
    from mu_fast.models.frozen import frozen_precision_of
    from mu_fast.report import write_json

    if delta is not None:
        from mu_fast.edit.delta import EditDelta, apply_delta

        loaded = EditDelta.load(delta)  # a damaged delta is refused before the model loads
    m, tok, info = load_model_ref(ref, dtype)
    results: dict[str, Any] = {"model": info.get("model")}
    if delta is not None:
        apply_delta(m, loaded, check_base=check_base)
        results["delta"] = {"path": str(delta), "trained_frozen": loaded.provenance.get("trained_frozen"),
                            "dtype": loaded.provenance.get("dtype"), "base": loaded.provenance.get("base")}
    # Every number below was measured on this model: its weights' precision and, for an applied delta, the frozen
    # precision that delta was trained against (which may differ: int8 / nf4 edits are evaluated on bf16).
    results["precision"] = {"weights": frozen_precision_of(m),
                            "edit_trained_frozen": results.get("delta", {}).get("trained_frozen")}
    task = task or organism_task_of(info, forget_split, inject_label, tok, ref)
    results["formats"] = evaluate_task(m, tok, task, progress=True)
    known = check_known_facts(m, tok, task, baseline=results["formats"])
    for problem in known.problems:
        if "tokenizer does not know" in problem:  # low accuracy is expected after an edit; unknown tokens never are
            import warnings

            warnings.warn(problem + "; these numbers measure nothing", UserWarning, stacklevel=1)
    results["unknown_tokens"] = {k: v.get("unknown_token_prompts", 0) for k, v in known.sets.items()}
    if relearn:
        from mu_fast.sweep.evaluations import RELEARN_DEFAULTS

        steps = relearn_settings.get("steps", RELEARN_DEFAULTS["steps"])  # scored at 0, half-way and the end
        results["relearn"] = relearn_attack(m, tok, task, progress=True, eval_at=tuple(sorted({0, steps // 2, steps})),
                                            **relearn_settings)
        results["relearn_settings"] = relearn_settings
    if probes:
        results["latent_probes"] = latent_probes(m, tok, task, **probe_settings)
        results["probe_settings"] = probe_settings
    precision = results["precision"]
    caption = f"measured on {precision['weights']} weights" + (
        f"; the delta was trained against {precision['edit_trained_frozen']} frozen weights" if delta is not None else "")
    print_evaluation(results, f"{task.name}: accuracy per format", caption)
    if out:
        from mu_fast.provenance import provenance_block

        device = m.get_input_embeddings().weight.device
        results["provenance"] = provenance_block(model=identity_of(ref, info, m, dtype), device=device)
        with writing_output("--out", out, "the results are printed above; nothing was written"):
            write_json(out, results)



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
