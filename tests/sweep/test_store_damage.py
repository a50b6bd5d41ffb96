"""Damaged stores: a copied record (run_id not its config's) is not trusted, damaged lines are skipped with one
warning naming the store, the reasons and the lines, the good records are never lost, reports and dry runs never
crash and never claim more seeds than a row has; a full disk is one line and leaves the store as it was."""

from __future__ import annotations

import copy
import errno
import json
import os
import re

import pytest
import yaml

import mu_fast.sweep as sweep
from mu_fast.sweep import report
from mu_fast.sweep.store import Store
from tests.sweep._fake_runs import SPEC, FakeWorker, fake_record
from tests.test_cli import no_loading, run_main  # noqa: F401 (fixture)


@pytest.fixture
def fake_runs(monkeypatch, no_loading):  # noqa: F811
    """Runs execute without a model (tests/sweep/_fake_runs.py); returns the list of run ids executed."""
    import mu_fast.sweep.worker

    monkeypatch.setattr(mu_fast.sweep.worker, "Worker", FakeWorker)
    FakeWorker.executed = []
    return FakeWorker.executed


def spec(**overrides):
    return {**copy.deepcopy(SPEC), **overrides}


def write_lines(path, lines):
    path.write_bytes(b"".join(lines))


def line(record):
    return (json.dumps(record) + "\n").encode()


def warning_lines(err):
    """mu_fast's warnings about stores (matplotlib may add its own about empty legends)."""
    return [x for x in err.splitlines() if x.startswith("mu-fast: warning: store")]


def test_a_copied_record_whose_run_id_is_not_its_configs_is_not_trusted(tmp_path, fake_runs):
    runs = sweep.expand(spec(methods=["flu"]))
    assert [r.seed for r in runs] == [0, 1]
    store = tmp_path / "r.jsonl"
    seed0 = fake_record(runs[0].to_dict())
    copied = {**seed0, "run_id": runs[1].run_id}  # stands for seed 1, holds seed 0's config and numbers
    write_lines(store, [line(seed0), line(copied)])
    named = re.escape(f"store {str(store)!r}") + r".*1 whose run_id differs from its config.run_id \(line 2\)"
    with pytest.warns(sweep.store.StoreDamageWarning, match=named):
        text = report.format_table(store)
    assert "over 1 seed" in text and "2 seeds" not in text  # not seed 0 averaged twice as "2 seeds"
    with pytest.warns(sweep.store.StoreDamageWarning, match=named):
        result = sweep.run(spec(methods=["flu"]), store=store, progress=False)
    assert fake_runs == [runs[1].run_id] and (result.skipped, result.ok) == (1, 1)  # the run it stood for ran
    with pytest.warns(sweep.store.StoreDamageWarning):
        text = report.format_table(store)
    row = next(x for x in text.splitlines() if x.startswith("flu"))
    assert "over 2 seeds" in text and "0.15±0.07" in row  # seeds 0 and 1: 0.1 and 0.2


def damaged_store(tmp_path):
    """flu: seeds 0 and 1; atp: seed 0 good, seed 1 torn; and every other kind of damaged line in between."""
    runs = {(r.method, r.seed): r.to_dict() for r in sweep.expand(spec())}
    store = tmp_path / "r.jsonl"
    write_lines(store, [
        line(fake_record(runs[("flu", 0)])),
        b"this is not JSON\n",                                              # 2: garbage
        line(fake_record(runs[("flu", 1)])),
        b'\xff\xfe{"run_id": "x"}\n',                                      # 4: not UTF-8
        line(fake_record(runs[("atp", 0)])),
        line({"run_id": "abc0123456789def", "status": "ok", "metrics": {"forget_err": 0.9}}),  # 6: no config
        b"\n",                                                              # blank lines are not damage
        line([1, 2, 3]),                                                    # 8: JSON, not a record
        line(fake_record(runs[("atp", 1)]))[:60],                           # 9: torn (a killed writer)
    ])
    return store, runs


def test_damaged_lines_are_skipped_with_one_warning_and_good_records_kept(tmp_path):
    store, runs = damaged_store(tmp_path)
    st = Store(store)
    with pytest.warns(sweep.store.StoreDamageWarning) as caught:
        good = st.records()
        st.records()  # the same damage is not warned twice
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "\n" not in message and f"store {str(store)!r}: skipped 5 of 8 lines" in message
    for part in ("2 not JSON (torn or garbage) (lines 2, 9)", "1 not UTF-8 (line 4)", "1 with no config (line 6)",
                 "1 not a run record (line 8)"):
        assert part in message, message
    assert [r["run_id"] for r in good] == [runs[k]["run_id"] for k in (("flu", 0), ("flu", 1), ("atp", 0))]
    assert st.skipped == 5 and st.damage["not UTF-8"] == [4]


def test_report_of_a_damaged_store_says_what_was_skipped_and_the_true_seed_counts(tmp_path, capsys):
    store, _ = damaged_store(tmp_path)
    code, out, err = run_main(["report", str(store), "--out", str(tmp_path / "rep")], capsys)
    assert code == 0, err
    warned = warning_lines(err)
    assert len(warned) == 1 and str(store) in warned[0] and "lines 2, 9" in warned[0] and "line 6" in warned[0], err
    lines = out.splitlines()
    assert "over 1–2 seeds (n: per row)" in lines[0] and "over 2 seeds" not in out
    header = lines[1].split()
    assert header[:2] == ["method", "n"]
    rows = {x.split()[0]: x.split() for x in lines[3:] if x.startswith(("flu", "atp"))}
    assert rows["flu"][1] == "2" and rows["atp"][1] == "1"  # atp's seed 1 was the torn line
    assert rows["atp"][2] == "0.10" and rows["flu"][2] == "0.15±0.07"


def test_a_cell_over_fewer_records_than_its_row_says_so():
    records = [fake_record({"run_id": f"r{s}", "seed": s, "method": "flu", "model": {"ref": "m"},
                            "task": {"dataset": "d", "forget_split": "s", "inject_label": "l"}}) for s in (0, 1)]
    del records[1]["metrics"]["maintain_acc"]
    text = report.format_table(records)
    assert "over 2 seeds" in text and "0.90 (n=1)" in text


def test_record_without_config_never_crashes_report_or_dry_run(tmp_path, capsys, no_loading):  # noqa: F811
    runs = sweep.expand(spec())
    store = tmp_path / "r.jsonl"
    write_lines(store, [line(fake_record(runs[0].to_dict())),
                        line({"run_id": runs[1].run_id, "status": "ok", "timings": {"total": 3.0}})])
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec()))
    code, out, err = run_main(["sweep", str(path), "--dry-run", "--out", str(store)], capsys)
    assert code == 0, err
    assert f"{len(runs)} runs, 1 already stored, {len(runs) - 1} to run" in out  # the config-less one is not done
    assert len(warning_lines(err)) == 1 and "1 with no config (line 2)" in err
    code, out, err = run_main(["report", str(store), "--out", str(tmp_path / "rep")], capsys)
    assert code == 0 and "over 1 seed" in out and len(warning_lines(err)) == 1, err


def test_a_corrupt_store_says_it_is_damaged_not_empty(tmp_path, capsys):
    store = tmp_path / "r.jsonl"
    store.write_bytes(b"\x00\x01garbage\n" + os.urandom(64).replace(b"\n", b"") + b"\n{torn json\n")
    code, _, err = run_main(["report", str(store)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "holds no readable run record: all 3 lines are damaged" in err and "holds no finished run" not in err
    assert "lines 1, 2, 3" in err or ("line" in err and "not" in err)


# ------------------------------------------------------------------------------------------------ disk full
def _failing_write(store, monkeypatch, short=False, after=0):
    """``os.write`` on the store's file descriptor fails as on a full disk (after ``after`` good writes): ENOSPC, or
    (``short``) writes half the bytes and returns their count."""
    real, calls = os.write, [0]

    def write(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}") != str(store.resolve()):
            return real(fd, data)
        calls[0] += 1
        if calls[0] <= after:
            return real(fd, data)
        if short:
            return real(fd, bytes(data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", write)


@pytest.mark.parametrize("short", [False, True])
def test_disk_full_is_one_line_and_leaves_the_store_as_it_was(tmp_path, monkeypatch, short):
    store = tmp_path / "r.jsonl"
    st = Store(store)
    st.append({"run_id": "a", "config": {"run_id": "a"}, "status": "ok"})
    before = store.read_bytes()
    _failing_write(store, monkeypatch, short=short)
    record = {"run_id": "b", "config": {"run_id": "b"}, "status": "ok", "blob": "x" * 1000}
    with pytest.raises(OSError) as err:
        st.append(record)
    text = str(err.value)
    assert isinstance(err.value, ValueError)  # the command line prints it as one line
    assert "\n" not in text and str(store) in text and f"{len(sweep.store.encode_record(record))}-byte record" in text
    assert "free space" in text and "kept" in text
    assert store.read_bytes() == before  # no half record left behind
    monkeypatch.undo()
    st.append(record)
    assert [r["run_id"] for r in st.records()] == ["a", "b"] and st.skipped == 0


def test_disk_full_during_a_sweep_is_one_line_and_keeps_finished_runs(tmp_path, capsys, monkeypatch, fake_runs):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec()))
    store = tmp_path / "r.jsonl"
    _failing_write(store, monkeypatch, after=1)
    code, _, err = run_main(["sweep", str(path), "--out", str(store)], capsys)
    errors = [x for x in err.splitlines() if "mu-fast: error:" in x]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert "No space left on device" in errors[0] and "free space" in errors[0] and str(store) in errors[0]
    assert len(sweep.load_results(store)) == 1  # the finished run is kept; a rerun skips it
