"""The ``mu-fast`` command line: ``demo``, ``localize``, ``edit`` / ``evaluate`` (``mu_fast.cli_edit``), ``plan``
(``mu_fast.cli_plan``), ``run`` / ``sweep`` / ``report`` (``mu_fast.cli_run``) and ``env``.

Every command checks its options, paths and names before any slow work (``mu_fast.preflight``): a bad option
costs a second, not a model load, and every output path is checked for writing before anything loads. User errors
are one line on stderr (exit 2), on a line of their own (an open progress bar is ended first); ``--debug``, given
anywhere on the command line, shows the traceback. Third-party progress bars and warnings are silenced
(``mu_fast.console``); mu_fast's own warnings are one line. Help is plain text that wraps at any width (no rich
panels, whose narrow columns cut words with "…").
"""

from __future__ import annotations

import sys

from mu_fast.determinism import wants_portable_kernels, use_portable_kernels

# The demo's portable kernels must be chosen before torch loads, and building the commands' flags (EditConfig's
# fields) imports torch: so decide here, before the imports below, from the command line this process runs.
if wants_portable_kernels(sys.argv[1:]):
    use_portable_kernels()

import json  # noqa: E402
import os  # noqa: E402
import re
from pathlib import Path

import typer

from mu_fast.cli_common import (
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
from mu_fast.cli_demo import demo_cmd
from mu_fast.cli_edit import edit_cmd, evaluate_cmd
from mu_fast.cli_plan import plan_cmd
from mu_fast.cli_run import report_cmd, run_cmd, sweep_cmd
from mu_fast.preflight import (
    WRITE_ERRNOS,
    OutputError,
    check_choice,
    check_output,
    check_positive,
    check_task_options,
    check_writable,
    mask_files,
    resolve_model,
    writing_output,
)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="mu_fast: fast mechanistic unlearning and editing.")

# Errors a user can cause (bad paths, names, options, budgets): one line naming the problem and the fix, no traceback
# unless --debug (or MU_FAST_DEBUG=1). Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError, IsADirectoryError,
               OutputError)


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
    """The ``mu-fast`` entry point: user errors become one line on stderr and exit status 2. ``--debug`` is taken
    anywhere on the command line (before or after the command)."""
    args = sys.argv[1:] if argv is None else list(argv)
    if "--debug" in args[1:]:
        args = ["--debug", *(a for a in args if a != "--debug")]
    debugging = "--debug" in args or os.environ.get("MU_FAST_DEBUG") == "1"
    try:
        app(args=args, prog_name="mu-fast")
    except USER_ERRORS as err:
        if debugging:
            raise
        _error_line(option_words(" ".join(str(err).split()) or type(err).__name__))
    except OSError as err:  # a filesystem error outside the commands' own write checks (disk full, read-only, ...)
        if debugging or err.errno not in WRITE_ERRNOS:
            raise
        where = f": {err.filename}" if err.filename else ""
        _error_line(f"cannot write{where} ({err.strerror or err}); free space or choose a writable output, then run "
                    "again (what was written before is kept)")


def _error_line(message: str) -> None:
    end_progress_lines()
    print(f"mu-fast: error: {message} (--debug shows the traceback)", file=sys.stderr)
    raise SystemExit(2) from None


def end_progress_lines() -> None:
    """Close the progress bars an error interrupted, so that the error starts a line of its own (a bar left open
    ends without a newline: in a log, the error would be glued onto it)."""
    std = sys.modules.get("tqdm.std")
    bars = list(getattr(getattr(std, "tqdm", None), "_instances", ()) or ())
    for bar in bars:
        try:
            bar.close()
        except Exception:  # noqa: BLE001 - a bar that cannot close must not hide the error
            pass
    if bars and not sys.stderr.isatty():
        sys.stderr.write("\n")  # closing clears a terminal line with \r; a log or pipe needs a real newline
    sys.stderr.flush()


_KEYWORD = re.compile(r"\b([a-z][a-z0-9_]*)=(True\b|False\b|'[^']*'|\"[^\"]*\"|(?=[\s,;.)]|$))")


def option_words(message: str) -> str:
    """A library message in command-line words: ``overwrite=True`` -> ``--overwrite``, ``check_base=False`` ->
    ``--no-check-base``, ``frozen='nf4'`` -> ``--frozen nf4``, ``offload_dir=`` -> ``--offload-dir``, for the keywords
    that are options of some command."""
    import typer.main

    options = {p.name for cmd in typer.main.get_command(app).commands.values() for p in cmd.params}

    def cli(match: re.Match) -> str:
        name, value = match[1], match[2]
        if name not in options:
            return match[0]
        flag = "--" + name.replace("_", "-")
        if value == "False":
            return "--no-" + flag[2:]
        return flag if value in ("True", "") else f"{flag} {value.strip(chr(39) + chr(34))}"

    return _KEYWORD.sub(cli, message)


# Short help of each command in the command list (click would cut the docstring's first sentence to fit).
COMMANDS = (
    ("demo", demo_cmd, "The whole job on the model organism: every method, several seeds."),
    ("localize", localize_cmd, "Localize the facts and save the Mask."),
    ("edit", edit_cmd, "Edit or unlearn the facts, training only the masked parameters."),
    ("evaluate", evaluate_cmd, "Evaluate a model (or a delta applied to it) in every format."),
    ("plan", plan_cmd, "Plan the GPU memory of an edit (no weights are loaded)."),
    ("run", run_cmd, "Localize, edit and evaluate MODEL with every method; compare them."),
    ("sweep", sweep_cmd, "Run a sweep spec's runs that its store does not hold yet."),
    ("report", report_cmd, "Print and write a sweep store's tables and plots."),
    ("env", env, "Versions, compiled backends and devices."),
)
for _name, _func, _short in COMMANDS:
    app.command(_name, short_help=_short)(_func)

if __name__ == "__main__":
    main()
