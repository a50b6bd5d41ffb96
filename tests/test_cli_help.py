"""The command line's help and options: nothing cut at 80 columns, defaults and choices shown, one seed option per
command, ranges checked at once, ``random:<shipped>`` where it makes sense, ``--no-check-base`` where the message
points."""

from __future__ import annotations

import time

import pytest
import typer.main
from typer.testing import CliRunner

from mu_fast.cli import app, main, option_words

COMMANDS = sorted(typer.main.get_command(app).commands)


def help_text(monkeypatch, *args: str) -> str:
    monkeypatch.setenv("COLUMNS", "80")
    result = CliRunner().invoke(app, [*args, "--help"], prog_name="mu-fast", terminal_width=80)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_help_shows_every_option_in_full_at_80_columns(command, monkeypatch):
    text = help_text(monkeypatch, *([command] if command else []))
    assert "…" not in text, text  # rich's mark of a cut word
    if not command:  # click's mark of a cut command summary
        assert not [line for line in text.splitlines()[1:] if line.endswith("...")], text
    assert max(len(line) for line in text.splitlines()) <= 80
    if command:
        params = typer.main.get_command(app).commands[command].params
        for param in params:
            if not getattr(param, "hidden", False):
                assert param.opts[0] in text or param.name in text, param.name


def test_edit_flags_show_their_defaults(monkeypatch):
    from mu_fast.edit.loop import EditConfig

    for command in ("edit", "run", "demo"):
        text = " ".join(help_text(monkeypatch, command).split())
        assert f"--lr <float> learning rate (AdamW, cosine decay to 0) [default: the preset's, else {EditConfig.lr:g}]" in text
        assert f"[default: the preset's, else {EditConfig.steps}]" in text
        assert "AdamW betas, as b1,b2 [default: the preset's, else 0.9,0.999]" in text


def test_dataset_and_forget_split_list_their_choices(monkeypatch):
    from mu_fast.data.counterfact import CF_FORGET_SPLITS
    from mu_fast.data.sports import FORGET_SPLIT_NAMES

    for command in ("localize", "edit", "evaluate", "run"):
        text = " ".join(help_text(monkeypatch, command).split())
        dataset = text[text.index("--dataset"):text.index("--forget-split")]
        assert all(name in dataset for name in ("organism", "sports", "counterfact")), dataset
        split = text[text.index("--forget-split"):text.index("--inject-label")]
        assert "_split" in split and "_unsplit" in split
        assert all(name in split for name in (*FORGET_SPLIT_NAMES, *CF_FORGET_SPLITS)), split


def test_run_has_one_seed_option_and_localize_has_one(monkeypatch):
    run_help = help_text(monkeypatch, "run")
    assert "--seeds" in run_help and "--seed " not in run_help and "--seed\n" not in run_help
    assert "--seed <int>" in help_text(monkeypatch, "localize")


@pytest.fixture
def no_loading(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded before the options were checked")

    import mu_fast.models.loading
    import mu_fast.organism

    monkeypatch.setattr(mu_fast.models.loading, "load_model", forbidden)
    monkeypatch.setattr(mu_fast.organism, "load_organism", forbidden)
    monkeypatch.delenv("MU_FAST_DEBUG", raising=False)


def one_line_error(args, capsys) -> str:
    start = time.perf_counter()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("mu-fast: error: "), err
    assert time.perf_counter() - start < 5.0  # refused at once, not after a model load
    return lines[0]


BAD = {
    "run --seed": (["run", "organism:ci", "--seed", "3"], "--seed is not an option of run: pass --seeds 3"),
    "demo --seed": (["demo", "--seed", "3"], "--seed is not an option of demo: pass --seeds 3"),
    "probe test fraction > 1": (["run", "organism:ci", "--probe-test-fraction", "1.5"],
                                "--probe-test-fraction must be in (0, 1); got 1.5"),
    "probe test fraction 0": (["evaluate", "organism:ci", "--probes", "--probe-test-fraction", "0"],
                              "--probe-test-fraction must be in (0, 1); got 0"),
    "lora dropout 1": (["evaluate", "organism:ci", "--relearn", "--relearn-lora-dropout", "1"],
                       "--relearn-lora-dropout must be in [0, 1); got 1"),
    "localize negative seed": (["localize", "organism:ci", "--seed", "-1"], "--seed must be a non-negative integer"),
    "random model, localize": (["localize", "random:gemma-2-9b"], "MODEL 'random:gemma-2-9b' has random weights and no tokenizer"),
    "random model, evaluate": (["evaluate", "random:llama3-8b"], "MODEL 'random:llama-3-8b' has random weights"),
    "random model, run": (["run", "random:gemma-7b", "--dataset", "sports"], "use it with `mu-fast plan`"),
    "unknown shipped config": (["localize", "random:gpt-9"], "MODEL 'random:gpt-9': no shipped config named 'gpt-9'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_options_are_refused_at_once_naming_the_option(case, capsys, no_loading, tmp_path):
    args, expected = BAD[case]
    assert expected in one_line_error([*args, "--out", tmp_path / "o"], capsys)


def test_plan_accepts_a_random_model(capsys):
    with pytest.raises(SystemExit) as done:
        main(["plan", "random:gemma-2-9b", "--mask", "paper:flu", "--budget", "24GB"])
    out = capsys.readouterr().out
    assert done.value.code in (0, None), out
    assert "gemma-2-9b (shipped config)" in out and "estimated peak" in out


def test_evaluate_offers_the_flag_its_base_check_names():
    import inspect

    import mu_fast.edit.delta as delta

    message = inspect.getsource(delta._check_base)
    assert "check_base=False" in message  # the library's words ...
    assert option_words("or pass check_base=False to apply it anyway") == "or pass --no-check-base to apply it anyway"
    evaluate = typer.main.get_command(app).commands["evaluate"]
    assert any("--no-check-base" in p.secondary_opts for p in evaluate.params)  # ... name a real flag
