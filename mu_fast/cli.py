"""The ``mu-fast`` command line: ``demo``, ``localize``, ``edit`` / ``evaluate`` (``mu_fast.cli_edit``), ``plan``
(``mu_fast.cli_plan``), ``run`` / ``sweep`` / ``report`` (``mu_fast.cli_run``) and ``env``.

Every command checks its options, paths and names before any slow work (``mu_fast.preflight``): a bad option
costs a second, not a model load. User errors are one line on stderr (exit 2); ``--debug`` shows the traceback.
Third-party progress bars and warnings are silenced (``mu_fast.console``); mu_fast's own warnings are one line.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import typer

from mu_fast.cli_common import (
    ALLOW_UNKNOWN,
    CLI_METHODS,
    DATASETS,
    DTYPE_NAMES,
    console,
    dataset_task,
    identity_of,
    load_model_ref,
    organism_task_of,
    require_known_facts,
)
from mu_fast.cli_edit import edit_cmd, evaluate_cmd
from mu_fast.cli_options import edit_flags, probe_flags, relearn_flags, with_flags
from mu_fast.cli_plan import plan_cmd
from mu_fast.cli_run import DEMO_METHODS, parse_methods, report_cmd, run_cmd, run_settings, report_run, sweep_cmd
from mu_fast.preflight import (
    ModelRef,
    check_choice,
    check_output,
    check_positive,
    check_task_options,
    mask_files,
    resolve_model,
)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="mu_fast: fast mechanistic unlearning and editing.")

# Errors a user can cause (bad paths, names, options, budgets): one line naming the problem and the fix, no traceback
# unless --debug (or MU_FAST_DEBUG=1). Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError, IsADirectoryError)
def _debugging() -> bool:
    return os.environ.get("MU_FAST_DEBUG") == "1"


@app.callback()
def _options(ctx: typer.Context,
             debug: bool = typer.Option(False, "--debug", help="show Python tracebacks and library warnings")) -> None:
    if debug:
        os.environ["MU_FAST_DEBUG"] = "1"
    if not _debugging():
        from mu_fast.console import quiet_third_party

        ctx.call_on_close(quiet_third_party())


@app.command()
@with_flags("probe_settings", probe_flags())
@with_flags("relearn_settings", relearn_flags())
@with_flags("settings", edit_flags())
def demo(
    out: Path = typer.Option(Path("reports/demo"), help="report folder (JSON + plots); finished methods are reused"),
    preset: str = typer.Option("demo", help="organism preset: demo (600 athletes, about 2 minutes to train) or ci (150 athletes, under a minute)"),
    forget_split: str = typer.Option("first_64_unsplit", help="forget split, as in the paper"),
    methods: str = typer.Option(DEMO_METHODS, help="comma-separated localization methods"),
    edit_preset: str = typer.Option("organism", help="edit settings the flags override (as `mu-fast run --preset`): organism (tuned on the organism), default, ..."),
    relearn: bool = typer.Option(True, help="run the relearning attack (settings: --relearn-*)"),
    probes: bool = typer.Option(True, help="run the latent-knowledge probes (settings: --probe-*)"),
    fresh: bool = typer.Option(False, help="recompute every method even if its result exists"),
    portable: bool = typer.Option(True, "--portable-kernels/--native-kernels", help="baseline x86-64 kernels and one thread, so the table is the same on every CPU (--native-kernels: this CPU's fastest kernels; the numbers then depend on the CPU)"),
    settings: dict[str, Any] | None = None,
    relearn_settings: dict[str, Any] | None = None,
    probe_settings: dict[str, Any] | None = None,
) -> None:
    """Train (or load) the model organism, then localize / edit / evaluate it with every method and compare.
    Every EditConfig field has a flag of its name (over --edit-preset); --relearn-* / --probe-* set the evaluations."""
    from mu_fast.determinism import DEMO_THREADS, use_portable_kernels

    t0 = time.perf_counter()
    wanted = portable
    portable = use_portable_kernels() if wanted else False  # before torch is imported
    check_choice("--preset", preset, ("demo", "ci"))
    method_list = parse_methods(methods)
    configs, options = run_settings(edit_preset, method_list, settings or {}, relearn, probes,
                                    relearn_settings or {}, probe_settings or {})
    check_task_options("organism", ModelRef("organism", preset), forget_split, "random_without_golf", None, DATASETS)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {str(out)!r} is a file; pass a folder for the report")

    import torch

    threads = torch.get_num_threads()
    if wanted:  # one thread even when the kernels could not be chosen: 2 threads stall on a loaded 2-core machine
        torch.set_num_threads(DEMO_THREADS)
    try:
        _demo(out, preset, forget_split, method_list, configs, options, fresh, portable, wanted, t0)
    finally:
        torch.set_num_threads(threads)


def _demo(out: Path, preset: str, forget_split: str, method_list: list[str], configs: dict[str, Any], options: Any,
          fresh: bool, portable: bool, wanted: bool, t0: float) -> None:
    from mu_fast.organism import OrganismConfig, cache_root, load_organism, organism_task
    from mu_fast.provenance import model_identity

    screen = console()
    screen.rule("[bold]mu_fast demo: the model organism")
    if not portable:
        why = "torch was loaded before the demo could choose" if wanted else "--native-kernels"
        screen.print(f"kernels: this CPU's own ({why}); the numbers can differ on another CPU", highlight=False)
    # An organism trained with other kernels is another organism: the portable one has its own cache folder.
    cache = cache_root().with_name("organism-portable") if portable else None
    org = load_organism(getattr(OrganismConfig, preset)(), cache_dir=cache, progress=True)
    t_org = time.perf_counter() - t0
    screen.print(f"organism ready in {t_org:.1f} s; argmax accuracy per format: {json.dumps({k: round(v, 3) for k, v in org.report.get('accuracy', {}).items()})}")
    task = organism_task(org.facts, forget_split=forget_split, inject_label="random_without_golf", tokenizer=org.tokenizer)
    provenance = {"organism": {"preset": preset, "config_hash": org.config.config_hash(), "path": str(org.path),
                               "trained_with": org.report.get("versions"),
                               "train_threads": org.report.get("train", {}).get("threads")}}
    identity = model_identity(f"organism:{preset}", {"organism": org}, org.model, "fp32")
    report_run(org.model, org.tokenizer, task, method_list, configs, options, out, fresh,
               f"organism ({preset}), {forget_split}, edit to a random other sport", identity,
               {"dataset": "organism", "forget_split": forget_split, "inject_label": "random_without_golf"}, False,
               provenance)
    kernels = "portable" if portable else "native"
    screen.print(f"kernels: {kernels}; total {time.perf_counter() - t0:.1f} s (organism {t_org:.1f} s)")


@app.command("localize")
def localize_cmd(
    model: str = typer.Argument(..., help="organism, organism:ci, a local HF checkpoint folder or a hub id"),
    method: str = typer.Option("flu", help=", ".join(CLI_METHODS)),
    dataset: str = typer.Option("organism", help="organism, sports or counterfact"),
    forget_split: str = typer.Option("first_16_unsplit"),
    inject_label: str = typer.Option("random_without_golf"),
    cf_model: str | None = typer.Option(None, help="CounterFact table: gemma-7b, gemma-2-9b, llama-3-8b"),
    budget: int | None = typer.Option(None, help="parameter budget (default: the paper's, FLU layers × MLP size)"),
    out: Path = typer.Option(Path("masks/mask"), help="mask path (writes .safetensors and .json)"),
    overwrite: bool = typer.Option(False, help="replace an existing mask at --out"),
    dtype: str = typer.Option("bf16", help="bf16, fp16 or fp32"),
    allow_unknown_facts: bool = typer.Option(False, ALLOW_UNKNOWN, help="run even if the model does not know the facts (unknown tokens, accuracy at chance)"),
) -> None:
    """Localize the facts and save the Mask."""
    check_choice("--method", method, CLI_METHODS)
    check_choice("--dtype", dtype, DTYPE_NAMES)
    check_positive("--budget", budget, integer=True)
    check_output("--out", mask_files(out), overwrite)
    ref = resolve_model(model)
    check_task_options(dataset, ref, forget_split, inject_label, cf_model, DATASETS)
    task = dataset_task(dataset, forget_split, inject_label, cf_model, None) if dataset != "organism" else None
    from mu_fast.localize import localize

    m, tok, info = load_model_ref(ref, dtype)
    task = task or organism_task_of(info, forget_split, inject_label, tok, ref)
    require_known_facts(m, tok, task, allow_unknown_facts)
    loc = localize(method, m, tok, task, budget=budget)
    from mu_fast.provenance import provenance_block

    identity = identity_of(ref, info, m, dtype)
    loc.mask.set_model(identity)  # applying the mask to another model is then refused (Mask.check_model)
    loc.mask.meta["provenance"] = provenance_block(model=identity, device=m.get_input_embeddings().weight.device)
    loc.mask.meta.setdefault("method", method)
    path = loc.mask.save(out, overwrite=overwrite)
    console().print(f"{method}: {[str(c) for c in loc.components]} — {loc.mask.param_count():,} parameters → {path}")


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
    console().print_json(json.dumps(info))


def main(argv: list[str] | None = None) -> None:
    """The ``mu-fast`` entry point: user errors become one line on stderr and exit status 2."""
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        app(args=args, prog_name="mu-fast")
    except USER_ERRORS as err:
        if "--debug" in args or os.environ.get("MU_FAST_DEBUG") == "1":
            raise
        message = option_words(" ".join(str(err).split()) or type(err).__name__)
        print(f"mu-fast: error: {message} (--debug shows the traceback)", file=sys.stderr)
        raise SystemExit(2) from None


_KEYWORD = re.compile(r"\b([a-z][a-z0-9_]*)=(True\b|'[^']*'|\"[^\"]*\"|(?=[\s,;.)]|$))")


def option_words(message: str) -> str:
    """A library message in command-line words: ``overwrite=True`` -> ``--overwrite``, ``frozen='nf4'`` ->
    ``--frozen nf4``, ``offload_dir=`` -> ``--offload-dir``, for the keywords that are options of some command."""
    import typer.main

    options = {p.name for cmd in typer.main.get_command(app).commands.values() for p in cmd.params}

    def cli(match: re.Match) -> str:
        name, value = match[1], match[2]
        if name not in options:
            return match[0]
        flag = "--" + name.replace("_", "-")
        return flag if value in ("True", "") else f"{flag} {value.strip(chr(39) + chr(34))}"

    return _KEYWORD.sub(cli, message)


app.command("edit")(edit_cmd)
app.command("evaluate")(evaluate_cmd)
app.command("plan")(plan_cmd)
app.command("run")(run_cmd)
app.command("sweep")(sweep_cmd)
app.command("report")(report_cmd)

if __name__ == "__main__":
    main()
