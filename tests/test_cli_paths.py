"""Output paths: every command refuses an output it cannot write in one line, before any model loads; a write that
fails at the end (read-only, permission, disk full) is one line saying what was kept; errors never share a line
with a progress bar; ``--debug`` is taken anywhere."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest

from mu_fast import preflight
from mu_fast.cli import main

REPO = Path(__file__).resolve().parents[1]
# Quick, but not timed to the millisecond: the test machine is shared (the imports are done before the clock starts).
FAST_SECONDS = 5.0


@pytest.fixture
def no_loading(monkeypatch):
    """Loading a model, the organism, or starting a sweep fails the test: the refusal must come first."""

    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the output path was checked")

    import mu_fast.models.edit_loading
    import mu_fast.models.loading
    import mu_fast.organism
    import mu_fast.sweep.engine
    import mu_fast.sweep.store

    monkeypatch.setattr(mu_fast.models.loading, "load_model", forbidden)
    monkeypatch.setattr(mu_fast.models.edit_loading, "load_for_edit", forbidden)
    monkeypatch.setattr(mu_fast.organism, "load_organism", forbidden)
    monkeypatch.setattr(mu_fast.sweep.engine, "run", forbidden)
    monkeypatch.setattr(mu_fast.sweep.store, "load_results", forbidden)
    monkeypatch.delenv("MU_FAST_DEBUG", raising=False)


def run_main(args, capsys):
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _bad_folder(kind: str, tmp_path: Path) -> Path:
    """A folder nothing can be written under: read-only (chmod; root ignores chmod, so /proc for root), a path
    through a file, or /sys (which even root cannot write)."""
    if kind == "read-only":
        if os.geteuid() == 0:
            return Path("/proc/mu_fast_no_such_dir")
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o555)
        return folder / "sub"
    if kind == "parent is a file":
        (tmp_path / "file.txt").write_text("x")
        return tmp_path / "file.txt" / "sub"
    return Path("/sys/kernel/mu_fast_test")


def _commands(bad: Path, tmp_path: Path) -> dict[str, list]:
    store = tmp_path / "store.jsonl"
    store.write_text("")
    spec = tmp_path / "spec.yaml"
    spec.write_text((REPO / "specs" / "ci_organism.yaml").read_text().replace("store: sweeps/ci_organism.jsonl",
                                                                             f"store: {bad / 'ci.jsonl'}"))
    return {
        "localize": ["localize", "organism:ci", "--out", bad / "mask"],
        "edit": ["edit", "organism:ci", "--mask", tmp_path / "none", "--out", bad / "edit"],
        "evaluate": ["evaluate", "organism:ci", "--out", bad / "eval.json"],
        "run": ["run", "organism:ci", "--methods", "flu", "--out", bad / "run"],
        "sweep --out": ["sweep", REPO / "specs" / "ci_organism.yaml", "--out", bad / "store.jsonl"],
        "sweep store:": ["sweep", spec],
        "report": ["report", store, "--out", bad / "report"],
        "run --preset paper": ["run", "google/gemma-2-9b", "--preset", "paper", "--dataset", "sports",
                               "--experiment", "forget_16", "--out", bad / "paper"],
        "demo": ["demo", "--out", bad / "demo"],
    }


KINDS = ("read-only", "parent is a file", "/sys")
COMMANDS = ("localize", "edit", "evaluate", "run", "sweep --out", "sweep store:", "report", "run --preset paper", "demo")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("command", COMMANDS)
def test_unwritable_outputs_are_refused_in_one_line_before_any_work(command, kind, tmp_path, capsys, no_loading):
    bad = _bad_folder(kind, tmp_path)
    args = _commands(bad, tmp_path)[command]
    start = time.perf_counter()
    code, out, err = run_main(args, capsys)
    seconds = time.perf_counter() - start
    lines = err.strip().splitlines()
    assert code == 2, (out, err)
    assert len(lines) == 1 and lines[0].startswith("mu-fast: error: ") and "Traceback" not in err, err
    assert str(bad) in lines[0] and ("cannot write" in lines[0] or "is a file" in lines[0]), lines[0]
    assert "--out" in lines[0] or "store" in lines[0], lines[0]
    assert seconds < FAST_SECONDS, seconds
    if kind == "read-only" and os.geteuid() != 0:
        bad.parent.chmod(0o755)


def test_the_check_leaves_nothing_behind(tmp_path):
    target = tmp_path / "a" / "b" / "out.json"
    assert preflight.check_writable("--out", target) == target
    assert preflight.check_writable("--out", tmp_path / "x" / "folder", folder=True)
    assert list(tmp_path.iterdir()) == []  # no folder created, no probe file left


def test_the_check_refuses_a_file_for_a_folder_and_a_read_only_store(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(preflight.OutputError, match="is a file; pass a folder"):
        preflight.check_writable("--out", tmp_path / "f", folder=True)
    with pytest.raises(preflight.OutputError, match="is a folder; pass a file path"):
        preflight.check_writable("--out", tmp_path)
    if os.geteuid() != 0:  # root may append to a read-only file
        store = tmp_path / "store.jsonl"
        store.write_text("")
        store.chmod(0o444)
        with pytest.raises(preflight.OutputError, match="cannot be appended to"):
            preflight.check_writable("--out", store, append=True)


@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOSPC, errno.EACCES, errno.ENOTDIR, errno.EDQUOT])
def test_a_failed_write_at_the_end_is_one_line_saying_what_was_kept(code, tmp_path):
    with pytest.raises(preflight.OutputError) as caught:
        with preflight.writing_output("--out", tmp_path / "r", "every run stored before is kept"):
            raise OSError(code, os.strerror(code), str(tmp_path / "r" / "x.json"))
    text = str(caught.value)
    assert text.startswith(f"--out '{tmp_path / 'r'}': writing failed: {os.strerror(code)}") and "\n" not in text
    assert text.endswith("every run stored before is kept") and "x.json" in text
    # mu_fast's own message for a short write (no errno) is one line too.
    with pytest.raises(preflight.OutputError, match="writing failed: short write to s.jsonl: 3 of 9 bytes"):
        with preflight.writing_output("--out", tmp_path / "s.jsonl", "kept"):
            raise OSError("short write to s.jsonl: 3 of 9 bytes (disk full?)")
    # Not a filesystem error: left alone (a bug keeps its traceback).
    with pytest.raises(OSError) as other:
        with preflight.writing_output("--out", tmp_path, "kept"):
            raise OSError(errno.ECONNRESET, "reset")
    assert not isinstance(other.value, preflight.OutputError)


def test_a_full_disk_during_a_sweep_is_one_line(tmp_path, capsys, monkeypatch):
    import mu_fast.sweep.engine

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "s.jsonl"))

    monkeypatch.setattr(mu_fast.sweep.engine, "run", full)
    monkeypatch.delenv("MU_FAST_DEBUG", raising=False)
    code, _, err = run_main(["sweep", REPO / "specs" / "ci_organism.yaml", "--out", tmp_path / "s.jsonl"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "No space left on device" in lines[0] and "every run stored before is kept" in lines[0], lines[0]


def test_a_read_only_file_system_anywhere_is_one_line(capsys, monkeypatch):
    """The last resort in main: an EROFS / ENOSPC OSError outside the commands' own write checks."""
    import mu_fast.cli

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", "/mnt/ro/x")

    monkeypatch.setattr(mu_fast.cli.localize, "check_output", read_only)
    monkeypatch.delenv("MU_FAST_DEBUG", raising=False)
    code, _, err = run_main(["localize", "organism"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Read-only file system" in lines[0] and "/mnt/ro/x" in lines[0], err


def test_an_error_never_shares_a_line_with_a_progress_bar(capsys, monkeypatch):
    import mu_fast.cli

    def fail_inside_a_bar(*args, **kwargs):
        from tqdm.auto import tqdm

        bar = tqdm(total=3, desc="before", leave=False, bar_format="{desc}: {n}/{total} stages{postfix}")
        bar.set_postfix_str("check facts")
        raise ValueError("the facts are unknown")

    monkeypatch.setattr(mu_fast.cli.localize, "check_output", fail_inside_a_bar)
    monkeypatch.delenv("MU_FAST_DEBUG", raising=False)
    code, _, err = run_main(["localize", "organism"], capsys)
    assert code == 2 and "check facts" in err  # the bar was drawn
    last = err.rstrip("\n").split("\n")[-1]
    assert last.startswith("mu-fast: error: the facts are unknown"), repr(err)


@pytest.mark.parametrize("where", ["after the command", "at the end", "before the command"])
def test_debug_is_taken_anywhere(where, no_loading):
    args = ["localize", "organism", "--method", "nope"]
    args = {"after the command": ["localize", "--debug", *args[1:]], "at the end": [*args, "--debug"],
            "before the command": ["--debug", *args]}[where]
    try:
        with pytest.raises(ValueError, match="--method 'nope'"):  # the traceback, not "No such option"
            main(args)
    finally:
        os.environ.pop("MU_FAST_DEBUG", None)
