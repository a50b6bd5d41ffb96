"""``mu-fast localize``: score the components of MODEL for the facts, pick them (budget-matched) and save the Mask
(``.safetensors`` and ``.json``, with the model identity and the provenance block)."""

from __future__ import annotations

from pathlib import Path

import typer

from mu_fast.cli.common import (
    ALLOW_UNKNOWN,
    CF_MODEL_HELP,
    CLI_METHODS,
    DATASET_HELP,
    DATASETS,
    DTYPE_NAMES,
    FORGET_SPLIT_HELP,
    INJECT_LABEL_HELP,
    MODEL_HELP,
    console,
    dataset_task,
    identity_of,
    load_model_ref,
    organism_task_of,
    require_known_facts,
)
from mu_fast.preflight import (
    check_choice,
    check_output,
    check_positive,
    check_task_options,
    check_writable,
    mask_files,
    resolve_model,
    writing_output,
)


def localize_cmd(
    model: str = typer.Argument(..., help=MODEL_HELP),
    method: str = typer.Option("flu", help=", ".join(CLI_METHODS)),
    dataset: str = typer.Option("organism", help=DATASET_HELP),
    forget_split: str = typer.Option("first_16_unsplit", help=FORGET_SPLIT_HELP),
    inject_label: str = typer.Option("random_without_golf", help=INJECT_LABEL_HELP),
    cf_model: str | None = typer.Option(None, help=CF_MODEL_HELP),
    budget: int | None = typer.Option(None, help="parameter budget (default: the paper's, FLU layers × MLP size)"),
    seed: int = typer.Option(0, help="seed of everything random in the localization (FLU's probes, AtP / CT's "
                                     "corruption noise, the random baselines), as `run --seeds`"),
    out: Path = typer.Option(Path("masks/mask"), help="mask path (writes .safetensors and .json)"),
    overwrite: bool = typer.Option(False, help="replace an existing mask at --out"),
    dtype: str = typer.Option("bf16", help="bf16, fp16 or fp32"),
    allow_unknown_facts: bool = typer.Option(False, ALLOW_UNKNOWN, help="run even if the model does not know the facts (unknown tokens, accuracy at chance)"),
) -> None:
    """Localize the facts and save the Mask."""
    check_choice("--method", method, CLI_METHODS)
    check_choice("--dtype", dtype, DTYPE_NAMES)
    check_positive("--budget", budget, integer=True)
    if seed < 0:
        raise ValueError(f"--seed must be a non-negative integer; got {seed}")
    check_output("--out", mask_files(out), overwrite)
    for path in mask_files(out):
        check_writable("--out", path)
    ref = resolve_model(model)
    check_task_options(dataset, ref, forget_split, inject_label, cf_model, DATASETS)
    task = dataset_task(dataset, forget_split, inject_label, cf_model, None) if dataset != "organism" else None
    from mu_fast.localize import localize

    m, tok, info = load_model_ref(ref, dtype)
    task = task or organism_task_of(info, forget_split, inject_label, tok, ref)
    require_known_facts(m, tok, task, allow_unknown_facts)
    loc = localize(method, m, tok, task, budget=budget, seed=seed)
    from mu_fast.provenance import provenance_block

    identity = identity_of(ref, info, m, dtype)
    loc.mask.set_model(identity)  # applying the mask to another model is then refused (Mask.check_model)
    loc.mask.meta["provenance"] = provenance_block(model=identity, device=m.get_input_embeddings().weight.device)
    loc.mask.meta.setdefault("method", method)
    loc.mask.meta.setdefault("seed", seed)
    components = [str(c) for c in loc.components]
    with writing_output("--out", out, f"nothing was saved; the localization chose {components} "
                                      f"(rerun with a writable --out)"):
        path = loc.mask.save(out, overwrite=overwrite)
    console().print(f"{method}: {components} — {loc.mask.param_count():,} parameters → {path}")
