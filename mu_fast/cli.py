"""The ``mu-fast`` command line: ``demo``, ``localize``, ``edit``, ``evaluate`` and ``env``."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="mu_fast: fast mechanistic unlearning and editing.")

# Errors a user can cause (bad paths, names, options, budgets): one line naming the problem and the fix, no traceback
# unless --debug (or MU_FAST_DEBUG=1). Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError, IsADirectoryError)


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug", help="show Python tracebacks for errors")) -> None:
    if debug:
        os.environ["MU_FAST_DEBUG"] = "1"

DATASETS = ("organism", "sports", "counterfact")


def load_task(dataset: str, forget_split: str, inject_label: str, model_info: dict[str, Any], tokenizer: Any,
              cf_model: str | None = None, lm_texts: str | None = None) -> Any:
    """Build the FactTask of ``dataset`` (organism / sports / counterfact) with the paper's split rules."""
    texts = None
    if lm_texts:
        from mu_fast.data import load_lm_texts

        texts = load_lm_texts(lm_texts, n=2048, seed=0)
    if dataset == "organism":
        from mu_fast.organism import organism_task

        org = model_info.get("organism")
        if org is None:
            raise typer.BadParameter("dataset 'organism' needs the organism model (MODEL = organism or organism:ci)")
        return organism_task(org.facts, forget_split=forget_split, inject_label=inject_label, tokenizer=tokenizer)
    if dataset == "sports":
        from mu_fast.data import load_sports_task

        return load_sports_task(forget_split=forget_split, inject_label=inject_label, lm_texts=texts)
    if dataset == "counterfact":
        from mu_fast.data import load_counterfact_task

        if not cf_model:
            raise typer.BadParameter("--cf-model is required for CounterFact (gemma-7b, gemma-2-9b or llama-3-8b): it picks the filtered table")
        return load_counterfact_task(model=cf_model, forget_split=forget_split, lm_texts=texts)
    raise typer.BadParameter(f"unknown dataset {dataset!r}; choose one of {DATASETS}")


def _console():
    from rich.console import Console

    return Console()


@app.command()
def demo(
    out: Path = typer.Option(Path("reports/demo"), help="report folder (JSON + plots)"),
    preset: str = typer.Option("demo", help="organism preset: demo (600 athletes, about 2 minutes to train) or ci (150 athletes, under a minute)"),
    forget_split: str = typer.Option("first_64_unsplit", help="forget split, as in the paper"),
    methods: str = typer.Option(",".join(("flu", "atp", "ct", "random", "random_mlps", "all_mlps", "nonlocalized")), help="comma-separated localization methods"),
    relearn: bool = typer.Option(True, help="run the relearning attack"),
    fresh: bool = typer.Option(False, help="recompute every method even if its result exists"),
) -> None:
    """Train (or load) the model organism, then localize / edit / evaluate it with every method and compare."""
    from dataclasses import replace

    from mu_fast.organism import OrganismConfig, load_organism, organism_task
    from mu_fast.pipeline import (
        ORGANISM_EDIT_GROUPS,
        ORGANISM_RUN_OPTIONS,
        compare_localizations,
        group_configs,
    )

    t0 = time.perf_counter()
    console = _console()
    if not hasattr(OrganismConfig, preset):
        raise typer.BadParameter(f"unknown preset {preset!r}; use demo or ci")
    console.rule("[bold]mu_fast demo: the model organism")
    org = load_organism(getattr(OrganismConfig, preset)(), progress=True)
    t_org = time.perf_counter() - t0
    console.print(f"organism ready in {t_org:.1f} s; argmax accuracy per format: {json.dumps({k: round(v, 3) for k, v in org.report.get('accuracy', {}).items()})}")
    task = organism_task(org.facts, forget_split=forget_split, inject_label="random_without_golf", tokenizer=org.tokenizer)
    method_list = [m.strip() for m in methods.split(",") if m.strip()]
    results = compare_localizations(
        org.model, org.tokenizer, task, method_list, group_configs(method_list, ORGANISM_EDIT_GROUPS),
        ORGANISM_RUN_OPTIONS if relearn else replace(ORGANISM_RUN_OPTIONS, relearn=False), out_dir=out, resume=not fresh,
        title=f"organism ({preset}), {forget_split}, edit to a random other sport",
    )
    console.print(f"FLU layers (probe gain at the subject's last token): {results['flu']['layers']}")
    console.print(f"report: {out}/ (results.json, probe_accuracy.png, localization_map.png, robustness.png)")
    console.print(f"total {time.perf_counter() - t0:.1f} s (organism {t_org:.1f} s)")


@app.command("localize")
def localize_cmd(
    model: str = typer.Argument(..., help="organism, organism:ci, a local HF checkpoint or a hub id"),
    method: str = typer.Option("flu", help="flu, atp, ct, atp_mlps, ct_mlps, random, random_mlps, all_mlps, nonlocalized"),
    dataset: str = typer.Option("organism", help="organism, sports or counterfact"),
    forget_split: str = typer.Option("first_16_unsplit"),
    inject_label: str = typer.Option("random_without_golf"),
    cf_model: str | None = typer.Option(None, help="CounterFact table: gemma-7b, gemma-2-9b, llama-3-8b"),
    budget: int | None = typer.Option(None, help="parameter budget (default: the paper's, FLU layers × MLP size)"),
    out: Path = typer.Option(Path("masks/mask"), help="mask path (writes .safetensors and .json)"),
    overwrite: bool = typer.Option(False),
    dtype: str = typer.Option("bf16"),
) -> None:
    """Localize the facts and save the Mask."""
    from mu_fast.localize import localize
    from mu_fast.models.loading import load_model

    m, tok, info = load_model(model, dtype=dtype)
    task = load_task(dataset, forget_split, inject_label, info, tok, cf_model)
    loc = localize(method, m, tok, task, budget=budget)
    path = loc.mask.save(out, overwrite=overwrite)
    _console().print(f"{method}: {[str(c) for c in loc.components]} — {loc.mask.param_count():,} parameters → {path}")


@app.command("edit")
def edit_cmd(
    model: str = typer.Argument(...),
    mask: Path = typer.Option(..., help="a mask saved by `mu-fast localize`"),
    dataset: str = typer.Option("organism"),
    forget_split: str = typer.Option("first_16_unsplit"),
    inject_label: str = typer.Option("random_without_golf", help="random_without_golf, golf or None (unlearning)"),
    cf_model: str | None = typer.Option(None),
    lm_texts: str | None = typer.Option(None, help="text/jsonl file (or 'pile' online) for the LM retain loss"),
    steps: int = typer.Option(50),
    lr: float = typer.Option(1e-5),
    forget_coef: float = typer.Option(1.0),
    optimizer: str = typer.Option("auto", help="auto, masked (MaskedAdamW) or torch"),
    out: Path = typer.Option(..., help="folder for the edited model (save_pretrained)"),
    overwrite: bool = typer.Option(False),
    dtype: str = typer.Option("bf16"),
) -> None:
    """Edit (or unlearn) the forget facts, training only the masked parameters, and save the model."""
    from mu_fast.edit import EditConfig, edit
    from mu_fast.masks import Mask
    from mu_fast.models.loading import load_model

    if out.exists() and not overwrite:
        raise typer.BadParameter(f"{out} exists; pass --overwrite to replace it (the old model is kept until the new one is saved)")
    m, tok, info = load_model(model, dtype=dtype)
    task = load_task(dataset, forget_split, inject_label, info, tok, cf_model, lm_texts)
    config = EditConfig(steps=steps, lr=lr, forget_coef=forget_coef, optimizer=optimizer, lm_coef=1.0 if task.lm_texts else 0.0)
    result = edit(m, tok, task, Mask.load(mask), config)
    _save_model_atomically(m, tok, out, {"edit": result.config, "history": result.history})
    _console().print(f"edited in {result.seconds:.1f} s with {result.optimizer}; saved to {out}")


@app.command("evaluate")
def evaluate_cmd(
    model: str = typer.Argument(...),
    dataset: str = typer.Option("organism"),
    forget_split: str = typer.Option("first_16_unsplit"),
    inject_label: str = typer.Option("random_without_golf"),
    cf_model: str | None = typer.Option(None),
    relearn: bool = typer.Option(False, help="also run the relearning attack"),
    probes: bool = typer.Option(False, help="also run latent-knowledge probes"),
    out: Path | None = typer.Option(None, help="write the results JSON here"),
    dtype: str = typer.Option("bf16"),
) -> None:
    """Evaluate forget / maintain accuracy in every format (and optionally relearning and probes)."""
    from mu_fast.evaluate import evaluate_task, latent_probes, relearn_attack
    from mu_fast.models.loading import load_model
    from mu_fast.report import write_json

    m, tok, info = load_model(model, dtype=dtype)
    task = load_task(dataset, forget_split, inject_label, info, tok, cf_model)
    results: dict[str, Any] = {"formats": evaluate_task(m, tok, task, progress=True)}
    if relearn:
        results["relearn"] = relearn_attack(m, tok, task, progress=True)
    if probes:
        results["latent_probes"] = latent_probes(m, tok, task)
    from rich.table import Table

    table = Table(title=f"{task.name}: accuracy per format")
    for col in ("format", "split", "acc", "argmax", "edit acc", "n"):
        table.add_column(col)
    for fmt, splits in results["formats"].items():
        for split, v in splits.items():
            edit_acc = v.get("edit_acc")
            table.add_row(fmt, split, f"{v['acc']:.3f}", f"{v['argmax_acc']:.3f}", "—" if edit_acc is None else f"{edit_acc:.3f}", str(v["n"]))
    _console().print(table)
    if out:
        write_json(out, results)


@app.command()
def env() -> None:
    """Versions, compiled backends and devices."""
    import platform

    import torch

    import mu_fast

    info = {"mu_fast": mu_fast.__version__, "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] or ["cpu"]}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    info["backends"] = mu_fast.backends()
    _console().print_json(json.dumps(info))


def _save_model_atomically(model: Any, tokenizer: Any, out: Path, extra: dict[str, Any]) -> None:
    """save_pretrained into a temporary sibling folder, then swap it in: a crash never leaves half a model."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "mu_fast_edit.json").write_text(json.dumps(extra, indent=2, default=str))
        if out.exists():
            old = out.with_name(out.name + ".old")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def main(argv: list[str] | None = None) -> None:
    """The ``mu-fast`` entry point: user errors become one line on stderr and exit status 2."""
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        app(args=args, prog_name="mu-fast")
    except USER_ERRORS as err:
        if "--debug" in args or os.environ.get("MU_FAST_DEBUG") == "1":
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"mu-fast: error: {message} (--debug shows the traceback)", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
