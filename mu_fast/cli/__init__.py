"""The ``mu-fast`` command line, one module per command: ``demo`` (``mu_fast.cli.demo``), ``localize``
(``.localize``), ``edit`` (``.edit``), ``evaluate`` (``.evaluate``), ``plan`` (``.plan``), ``run`` (``.run``; its
``--preset paper`` in ``.paper`` and ``.paper_sequential``), ``sweep`` (``.sweep``), ``report`` (``.report``) and
``env`` (``.env``). What the commands share is in ``.common`` (option choices, help strings, task building, model
loading, the seed / method lists, the run report) and ``.options`` (the flags generated from ``EditConfig`` and the
evaluations' settings, their checks, the presets). This module builds the typer ``app`` and holds the one entry point,
``main`` (console script ``mu-fast``; also ``python -m mu_fast.cli``).

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
# fields) imports torch: so decide here, before the imports below, from the command line this process runs. Every
# command module is a submodule of this package, so importing any of them runs this first.
if wants_portable_kernels(sys.argv[1:]):
    use_portable_kernels()

import os  # noqa: E402
import re  # noqa: E402

import typer  # noqa: E402

from mu_fast.cli import demo, edit, env, evaluate, localize, plan, report, run, sweep  # noqa: E402
from mu_fast.preflight import WRITE_ERRNOS, OutputError  # noqa: E402

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
    ("demo", demo.demo_cmd, "The whole job on the model organism: every method, several seeds."),
    ("localize", localize.localize_cmd, "Localize the facts and save the Mask."),
    ("edit", edit.edit_cmd, "Edit or unlearn the facts, training only the masked parameters."),
    ("evaluate", evaluate.evaluate_cmd, "Evaluate a model (or a delta applied to it) in every format."),
    ("plan", plan.plan_cmd, "Plan the GPU memory of an edit (no weights are loaded)."),
    ("run", run.run_cmd, "Localize, edit and evaluate MODEL with every method; compare them."),
    ("sweep", sweep.sweep_cmd, "Run a sweep spec's runs that its store does not hold yet."),
    ("report", report.report_cmd, "Print and write a sweep store's tables and plots."),
    ("env", env.env_cmd, "Versions, compiled backends and devices."),
)
for _name, _func, _short in COMMANDS:
    app.command(_name, short_help=_short)(_func)
