"""The results store: atomic one-line appends, torn lines skipped without harm, concurrent writers never corrupt."""

from __future__ import annotations

import json
import multiprocessing as mp
import os

import pytest

from mu_fast.sweep.store import Store, encode_record, load_results


def record(i: int, status: str = "ok", payload: int = 10) -> dict:
    return {"run_id": f"run{i:04d}", "status": status, "metrics": {"forget_err": i / 1000, "nan": float("nan")},
            "blob": "x\ny" * payload, "config": {"run_id": f"run{i:04d}"}}


def test_round_trip_one_line_per_record(tmp_path):
    store = Store(tmp_path / "sub" / "r.jsonl")
    assert store.records() == []
    for i in range(3):
        store.append(record(i))
    lines = store.path.read_bytes().splitlines()
    assert len(lines) == 3  # newlines inside strings are escaped
    got = store.records()
    assert [r["run_id"] for r in got] == ["run0000", "run0001", "run0002"]
    assert got[1]["metrics"] == {"forget_err": 0.001, "nan": "nan"} and got[1]["blob"] == "x\ny" * 10
    with pytest.raises(ValueError, match="needs a run_id"):
        store.append({"status": "ok"})


def test_torn_last_line_is_skipped_and_never_harms_earlier_records(tmp_path):
    store = Store(tmp_path / "r.jsonl")
    for i in range(3):
        store.append(record(i))
    good = store.path.read_bytes()
    # a writer killed in the middle of its line (what a crash without the single-write guarantee would leave)
    torn = encode_record(record(3))[:37]
    with open(store.path, "ab") as f:
        f.write(torn)
    assert [r["run_id"] for r in store.records()] == ["run0000", "run0001", "run0002"] and store.skipped == 1
    store.append(record(4))
    assert store.path.read_bytes().startswith(good + torn + b"\n")  # the fragment is ended, not overwritten
    assert [r["run_id"] for r in store.records()] == ["run0000", "run0001", "run0002", "run0004"]
    assert store.skipped == 1


def test_latest_record_per_run_and_finished(tmp_path):
    store = Store(tmp_path / "r.jsonl")
    store.append(record(1, "failed"))
    store.append(record(2, "ok"))
    assert store.finished() == {"run0001", "run0002"} and store.finished(include_failed=False) == {"run0002"}
    store.append(record(1, "ok"))
    assert store.latest()["run0001"]["status"] == "ok" and len(store.records()) == 3
    assert {r["run_id"] for r in load_results(store.path)} == {"run0001", "run0002"}
    with pytest.raises(FileNotFoundError, match="no results store"):
        load_results(tmp_path / "none.jsonl")


def _writer(path: str, worker: int, count: int, payload: int) -> None:
    store = Store(path, fsync=False)
    for i in range(count):
        store.append(record(worker * 1000 + i, payload=payload))


def test_concurrent_writers_never_interleave(tmp_path):
    path = str(tmp_path / "r.jsonl")
    # ~200 KB lines: far beyond PIPE_BUF, so only the lock keeps two writers' bytes apart
    payload, workers, count = 70_000, 4, 25
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(path, w, count, payload)) for w in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    store = Store(path)
    got = store.records()
    assert store.skipped == 0 and len(got) == workers * count
    assert sorted(r["run_id"] for r in got) == sorted(f"run{w * 1000 + i:04d}" for w in range(workers) for i in range(count))
    assert all(r["blob"] == "x\ny" * payload for r in got)
    assert all(json.loads(line) for line in open(path, "rb"))
    assert os.path.getsize(path) == sum(len(encode_record(r)) for r in got)
