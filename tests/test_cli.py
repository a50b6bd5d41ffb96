"""The command line: `mu-fast demo` runs the whole job on the (CI) organism and writes its report; every user error
is one line on stderr, found before any model loads; library noise stays out of the output."""

import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mu_fast import preflight
from mu_fast.cli import app, main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_demo_runs_the_job_and_writes_the_report(ci_organism, cache_root, tmp_path, monkeypatch, umask_022):
    """The demo end to end on the CI organism: the lr rule's sweep chooses each method's learning rate (no stored
    choice matches these settings), then every method runs over two seeds; the report holds per-seed runs, the
    mean ± std table, the choice and its rule; a rerun recomputes nothing."""
    import transformers

    from mu_fast.organism.lr_choice import DEMO_LR_SEEDS, DEMO_RULE
    from mu_fast.sweep.lr_rule import choose_learning_rates
    from mu_fast.sweep.store import load_results

    monkeypatch.setenv("MU_FAST_CACHE_DIR", str(cache_root))  # the CLI finds the session's trained CI organism
    out = tmp_path / "report"
    args = ["demo", "--preset", "ci", "--forget-split", "first_16_unsplit", "--methods", "flu,atp", "--seeds", "0,1",
            "--steps", "6", "--lr-grid", "3e-3,3e-2", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    # the CI organism ships with the package: loaded and verified, not trained
    assert "organism (shipped weights, checksums verified) ready" in result.output
    assert "(before edit)" in result.output
    assert "choosing learning rates by the rule" in result.output
    files = ["results.json", "lr_choice.json", "lr_sweep.jsonl", "probe_accuracy.png", "localization_map.png",
             "robustness.png", "runs.jsonl"]
    for name in files:
        assert (out / name).is_file(), name
        # world-readable like any file written under umask 022 (mkstemp alone makes 0600)
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, name
    results = json.loads((out / "results.json").read_text())
    assert list(results["methods"]) == ["flu", "atp"] and results["seeds"] == [0, 1]
    runs = load_results(out / "runs.jsonl", status=None)  # the runs: a sweep store, one record per method and seed
    assert sorted((r["config"]["method"], r["config"]["seed"]) for r in runs) == [("atp", 0), ("atp", 1), ("flu", 0),
                                                                                   ("flu", 1)]
    assert all(r["status"] == "ok" and r["config"]["model"]["ref"] == "organism:ci" for r in runs)
    assert {r["config"]["task"]["forget_split"] for r in runs} == {"first_16_unsplit"}

    # The lr rule: its sweep ran on the validation forget set, training format only, and its choice is the rule
    # applied to those records; each method then edited at its own chosen lr with the demo's shared settings.
    choice = results["lr_choice"]
    assert choice == json.loads((out / "lr_choice.json").read_text())
    records = load_results(out / "lr_sweep.jsonl", status=None)
    # methods x lrs x the rule's own seeds (DEMO_LR_SEEDS, whatever seeds the table runs)
    assert len(records) == 2 * 2 * len(DEMO_LR_SEEDS)
    assert {r["config"]["task"]["forget_split"] for r in records} == {"next_64_unsplit"}
    assert all(r["config"]["evaluations"]["formats"] == ["normal"] for r in records)
    # Both sides from the same records and the rule the demo applies (never a rule of the test's own: which lr
    # a rule picks depends on where trained numbers land, which differs between CPUs).
    expected = {m: c.lr for m, c in choose_learning_rates(records, DEMO_RULE).items()}
    assert {m: c["lr"] for m, c in choice["choices"].items()} == expected
    assert "smallest lr" in choice["rule"] and choice["validation_split"] == "next_64_unsplit"
    before = results["before"]["normal"]["forget"]["acc"]
    for method, record in results["methods"].items():
        summary, std = record["summary"], record["std"]
        assert summary["trainable_params"] > 0 and set(record["selections"]) == {"0", "1"}
        assert before > 0.9 and 0.0 <= summary["forget_err"] <= 1.0, (method, summary)
        assert 0.0 <= summary["relearn_acc"] <= 1.0 and "probe_true_acc" in summary and "forget_err" in std
        for seed, run in record["runs"].items():
            assert run["edit"]["config"]["lr"] == expected[method] and run["edit"]["config"]["steps"] == 6
            assert run["edit"]["config"]["seed"] == int(seed)

    # What the numbers came from, and what the names mean, are in the report.
    assert results["provenance"]["versions"]["transformers"] == transformers.__version__
    assert results["provenance"]["organism"]["config_hash"] == ci_organism.config.config_hash()
    assert "m0" not in results["legend"]["components"] and "mL" in results["legend"]["components"]
    assert results["known_facts"]["ok"]
    # The table (mean±std cells) and its legend fit 100 columns; third-party bars and warnings stay out.
    table = result.output[result.output.index("organism (ci)"):]
    assert "mean±std over 2 seeds" in table and "±" in table.splitlines()[5]
    assert "Components:" in table and "mL = MLP of layer L" in " ".join(table.split())
    assert all(len(line) <= 100 for line in table.splitlines()[:8]), table
    for noise in ("Loading weights", "Warning:", "warnings.warn", "deprecated"):
        assert noise not in result.output, noise

    # A second run with the same settings reuses the lr choice and every run: nothing is rewritten.
    store = (out / "runs.jsonl").read_text()
    sweep_size = (out / "lr_sweep.jsonl").stat().st_size
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert "choosing learning rates" not in again.output
    assert (out / "runs.jsonl").read_text() == store
    assert (out / "lr_sweep.jsonl").stat().st_size == sweep_size
    assert json.loads((out / "results.json").read_text())["methods"] == results["methods"]
    # The choice's key names no kernels or threads: under the other kernels the same choice applies, and so do the
    # runs (a sweep run is named by what it computes; the kernels are provenance, and the demo's table is the same
    # under either: mu_fast.determinism).
    native = CliRunner().invoke(app, args + ["--portable-kernels"])
    assert native.exit_code == 0, native.output
    assert "choosing learning rates" not in native.output
    assert (out / "lr_sweep.jsonl").stat().st_size == sweep_size
    assert (out / "runs.jsonl").read_text() == store
    assert json.loads((out / "results.json").read_text())["lr_choice"] == choice


def test_the_committed_lr_choice_is_the_rule_applied_to_its_own_candidates():
    """mu_fast/organism/demo_lr_choice.json (what `make demo` uses) is the stated rule applied to the candidate
    numbers it records, for the demo's organism, methods and settings (its key)."""
    from mu_fast.organism import OrganismConfig
    from mu_fast.organism.lr_choice import BASE_EDIT, CHOICE_FILE, DEMO_RULE, LR_GRID, choice_key, load_lr_choice
    from mu_fast.cli.demo import DEMO_METHODS
    from mu_fast.sweep.lr_rule import LRRule, choose

    key = choice_key(OrganismConfig.demo().config_hash(), DEMO_METHODS.split(","), DEMO_RULE, BASE_EDIT, LR_GRID)
    stored = load_lr_choice(key)
    assert stored is not None, f"{CHOICE_FILE} was not made for the demo's current settings; run mu-fast demo --choose-lr"
    rule = LRRule(**stored["rule_settings"])
    assert rule == DEMO_RULE and stored["rule"] == DEMO_RULE.describe()
    for method, entry in stored["choices"].items():
        assert [c["lr"] for c in entry["candidates"]] == list(LR_GRID)
        again = choose(method, entry["candidates"], rule)
        assert (again.lr, again.reason) == (entry["lr"], entry["reason"]), method


# ------------------------------------------------------------------ user errors: one line, before any loading
@pytest.fixture
def no_loading(monkeypatch):
    """Any attempt to load a model or the organism fails the test: the error must come first."""

    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded before the options were checked")

    import mu_fast.models.loading
    import mu_fast.organism

    monkeypatch.setattr(mu_fast.models.loading, "load_model", forbidden)
    monkeypatch.setattr(mu_fast.organism, "load_organism", forbidden)
    monkeypatch.delenv("MU_FAST_DEBUG", raising=False)


def run_main(args, capsys):
    """``main(args)``: (exit status, stdout, stderr)."""
    try:
        main(args)
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _checkpoint_dir(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    return folder


BAD_COMMANDS = {
    "unknown method": (["localize", "organism", "--method", "nope"], "--method 'nope' is not known"),
    "unknown dtype": (["localize", "organism", "--dtype", "fp8"], "--dtype 'fp8'"),
    "missing local path": (["localize", "./no/such/checkpoint"], "MODEL './no/such/checkpoint' does not exist"),
    "folder without config": (["localize", "{tmp}"], "is a folder without config.json"),
    "file as model": (["localize", "{tmp}/file.txt"], "is a file; pass the checkpoint folder"),
    "unknown organism preset": (["localize", "organism:huge"], "organism preset 'huge' is not known"),
    "existing mask output": (["localize", "organism", "--out", "{tmp}/old"], "pass --overwrite"),
    "bad budget": (["localize", "organism", "--budget", "-3"], "--budget must be a positive integer"),
    "organism dataset, other model": (["localize", "{ckpt}"], "--dataset organism needs MODEL organism"),
    "bad forget split": (["localize", "organism", "--forget-split", "first_3_unsplit"], "--forget-split 'first_3_unsplit'"),
    "bad inject label": (["localize", "organism", "--inject-label", "tennis"], "--inject-label 'tennis'"),
    "counterfact without table": (["localize", "{ckpt}", "--dataset", "counterfact"], "needs --cf-model"),
    "missing mask": (["edit", "organism", "--mask", "{tmp}/none", "--out", "{tmp}/e"], "--mask"),
    "existing edit output": (["edit", "organism", "--mask", "{tmp}/none", "--out", "{tmp}"], "pass --overwrite"),
    "bad steps": (["edit", "organism", "--mask", "{tmp}/none", "--out", "{tmp}/e", "--steps", "0"], "--steps must be"),
    "bad optimizer": (["edit", "organism", "--mask", "{tmp}/none", "--out", "{tmp}/e", "--optimizer", "sgd"], "--optimizer 'sgd'"),
    "existing evaluate output": (["evaluate", "organism", "--out", "{tmp}/file.txt"], "pass --overwrite"),
    "unknown demo preset": (["demo", "--preset", "huge", "--out", "{tmp}/r"], "--preset 'huge' is not known"),
    "unknown demo method": (["demo", "--methods", "flu,magic", "--out", "{tmp}/r"], "--methods entry 'magic'"),
    "repeated demo seeds": (["demo", "--seeds", "1,1", "--out", "{tmp}/r"], "--seeds '1,1' needs distinct"),
    "bad demo seeds": (["demo", "--seeds", "a", "--out", "{tmp}/r"], "--seeds 'a' is not a comma-separated"),
    "bad lr grid": (["demo", "--lr-grid", "fast", "--out", "{tmp}/r"], "--lr-grid 'fast'"),
    "negative lr grid": (["demo", "--lr-grid", "-1e-3", "--out", "{tmp}/r"], "needs positive learning rates"),
    "demo lr over the rule": (["demo", "--lr", "1e-3", "--out", "{tmp}/r"], "--lr would override every method"),
    "demo workers": (["demo", "--workers", "0", "--out", "{tmp}/r"], "--workers must be"),
    "run workers": (["run", "organism", "--workers", "0", "--out", "{tmp}/r"], "--workers must be"),
    "run seeds": (["run", "organism", "--seeds", "0,0", "--out", "{tmp}/r"], "--seeds '0,0' needs distinct"),
}


@pytest.mark.parametrize("case", list(BAD_COMMANDS))
def test_user_errors_are_one_line_before_any_loading(case, tmp_path, capsys, no_loading):
    args, expected = BAD_COMMANDS[case]
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "old.safetensors").write_bytes(b"")
    ckpt = _checkpoint_dir(tmp_path)
    args = [a.replace("{tmp}", str(tmp_path)).replace("{ckpt}", str(ckpt)) for a in args]
    start = time.perf_counter()
    code, out, err = run_main(args, capsys)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mu-fast: error: ") and "Traceback" not in err, err
    assert expected in lines[0], lines[0]
    assert "=True" not in lines[0] and "overwrite=" not in lines[0]  # options, not Python keywords
    assert time.perf_counter() - start < 30  # torch imports at most; no model


def test_debug_shows_the_traceback(capsys, no_loading):
    with pytest.raises(ValueError, match="--method 'nope'"):
        main(["--debug", "localize", "organism", "--method", "nope"])
    os.environ.pop("MU_FAST_DEBUG", None)


# ------------------------------------------------------------------ the hub: fail fast without a network
def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: connections are refused


@pytest.fixture
def hub_env(monkeypatch, tmp_path):
    import huggingface_hub.constants as hub_constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return hub_constants


def test_unreachable_hub_goes_offline_and_fails_fast(hub_env, monkeypatch, capsys, no_loading):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    start = time.perf_counter()
    code, _, err = run_main(["localize", "someone/some-model"], capsys)
    assert code == 2 and "did not answer" in err and "not in the local Hugging Face cache" in err, err
    assert time.perf_counter() - start < 30
    assert os.environ["HF_HUB_OFFLINE"] == "1" and hub_env.HF_HUB_OFFLINE is True
    monkeypatch.delenv("HF_HUB_OFFLINE")


def test_a_hanging_hub_is_given_up_after_the_timeout(monkeypatch):
    def hang(*args, **kwargs):
        time.sleep(30)

    monkeypatch.setattr(socket, "create_connection", hang)
    start = time.perf_counter()
    assert preflight.hub_reachable("https://hub.invalid", timeout=0.5) is False
    assert time.perf_counter() - start < 2


def test_the_real_hub_check_answers_in_seconds():
    start = time.perf_counter()
    preflight.hub_reachable(timeout=preflight.HUB_CHECK_SECONDS)  # no hub on CI: False, quickly
    assert time.perf_counter() - start < preflight.HUB_CHECK_SECONDS + 1.5


def test_offline_hub_id_in_the_local_cache_is_accepted(hub_env, monkeypatch, tmp_path):
    snapshot = tmp_path / "hub" / "models--someone--tiny" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert preflight.resolve_model("someone/tiny") == preflight.ModelRef("hub", "someone/tiny")
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE is set"):
        preflight.resolve_model("someone/other")


# ------------------------------------------------------------------ facts the model does not know
def test_organism_on_real_athletes_is_refused_before_localizing(ci_organism, cache_root, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("MU_FAST_CACHE_DIR", str(cache_root))
    monkeypatch.delenv("MU_FAST_DEBUG", raising=False)
    import mu_fast.localize

    calls = []

    class Stop(Exception):
        pass

    def fake_localize(*args, **kwargs):
        calls.append(args)
        raise Stop  # far enough: the check let it through

    monkeypatch.setattr(mu_fast.localize, "localize", fake_localize)
    args = ["localize", "organism:ci", "--dataset", "sports", "--out", str(tmp_path / "m")]
    code, _, err = run_main(args, capsys)
    assert code == 2 and not calls
    assert "does not know" in err and "'<unk>'" in err and "--allow-unknown-facts" in err, err
    # With the override it warns loudly (one line) and goes on to localize.
    with pytest.raises(Stop):
        main([*args, "--allow-unknown-facts"])
    assert calls and "mu-fast: warning: RUNNING ANYWAY" in capsys.readouterr().err


# ------------------------------------------------------------------ third-party noise, in a fresh process
def test_no_third_party_bars_or_warnings_in_a_command(ci_organism, cache_root, tmp_path):
    env = {**os.environ, "MU_FAST_CACHE_DIR": str(cache_root), "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "default"}
    env.pop("MU_FAST_DEBUG", None)
    out = tmp_path / "eval.json"
    proc = subprocess.run([sys.executable, "-m", "mu_fast.cli", "evaluate", "organism:ci", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout + proc.stderr
    for noise in ("Loading weights", "Warning:", "warnings.warn", "deprecated"):
        assert noise not in text, (noise, text[-2000:])
    results = json.loads(out.read_text())
    assert results["unknown_tokens"]["normal/forget"] == 0 and "provenance" in results


def test_library_messages_are_printed_in_option_words(monkeypatch, capsys, no_loading):
    import mu_fast.cli
    from mu_fast.cli import option_words

    assert option_words("pass overwrite=True to replace it") == "pass --overwrite to replace it"
    assert option_words("pass offload_dir= to offload, or use frozen='nf4'") == "pass --offload-dir to offload, or use --frozen nf4"
    assert option_words("pass check_base=False") == "pass --no-check-base"  # evaluate's flag
    assert option_words("pass base=None") == "pass base=None"  # not an option: left alone

    def deep_error(*args, **kwargs):
        raise FileExistsError("masks/m.safetensors already exists; pass overwrite=True to replace it")

    monkeypatch.setattr(mu_fast.cli.localize, "check_output", deep_error)
    code, _, err = run_main(["localize", "organism"], capsys)
    assert code == 2 and "pass --overwrite to replace it" in err and "overwrite=True" not in err
