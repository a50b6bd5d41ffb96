"""One driver per store: a second sweep on a store in use is refused at once with one line naming the store and the
pid holding it (in one process and across processes); a killed driver's lock never blocks the next one."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import mu_fast.sweep as sweep
from tests.sweep._fake_runs import SPEC, FakeWorker
from tests.test_cli import no_loading  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parents[2]

# A driver with fake runs (tests/sweep/_fake_runs.py). mode "wait": the first run waits for <store>.go;
# "die": the first run SIGKILLs its own process; "cli": runs `mu-fast sweep` instead of sweep.run.
DRIVER = """
import os, signal, sys, time
from pathlib import Path
import mu_fast.sweep.worker
from tests.sweep._fake_runs import FakeWorker
spec, store, mode = sys.argv[1:4]
class Driver(FakeWorker):
    def execute(self, run):
        if mode == "wait" and not FakeWorker.executed:
            Path(store + ".started").write_text("1")
            deadline = time.time() + 300
            while not Path(store + ".go").exists() and time.time() < deadline:
                time.sleep(0.05)
        if mode == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        return super().execute(run)
mu_fast.sweep.worker.Worker = Driver
if mode == "cli":
    from mu_fast.cli import main
    main(["sweep", spec, "--out", store])
else:
    import mu_fast.sweep as sweep
    sweep.run(spec, store=store, progress=False)
"""


@pytest.fixture
def fake_runs(monkeypatch, no_loading):  # noqa: F811
    import mu_fast.sweep.worker

    monkeypatch.setattr(mu_fast.sweep.worker, "Worker", FakeWorker)
    FakeWorker.executed = []
    return FakeWorker.executed


def test_a_second_driver_in_the_same_process_is_refused(tmp_path, fake_runs):
    store = tmp_path / "r.jsonl"
    refused = []

    def second_driver(run):
        if not refused:
            with pytest.raises(sweep.store.StoreInUseError) as err:
                sweep.run(SPEC, store=store, progress=False)
            refused.append(str(err.value))

    result = sweep.run(SPEC, store=store, progress=False, on_run_start=second_driver)
    runs = sweep.expand(SPEC)
    assert result.ok == len(runs) and sorted(fake_runs) == sorted(r.run_id for r in runs)  # each run once
    assert len(refused) == 1 and "\n" not in refused[0]
    assert f"store {str(store)!r} is in use by another sweep (pid {os.getpid()} on" in refused[0]
    assert not Path(f"{store}.lock").exists()  # the driver that ended removed its lock
    assert sweep.run(SPEC, store=store, progress=False).skipped == len(runs)  # and the next driver may start


def _driver(spec_path, store, mode):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "MU_FAST_DEBUG": ""}
    return subprocess.Popen([sys.executable, "-c", DRIVER, str(spec_path), str(store), mode], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_driver_processes_on_one_store_and_a_killed_drivers_lock(tmp_path, fake_runs):
    spec_path, store = tmp_path / "spec.yaml", tmp_path / "r.jsonl"
    spec_path.write_text(yaml.safe_dump(copy.deepcopy(SPEC)))
    runs = sweep.expand(SPEC)
    first = _driver(spec_path, store, "wait")
    try:
        deadline = time.time() + 300
        while not Path(f"{store}.started").exists():
            assert first.poll() is None and time.time() < deadline, first.communicate()[1][-2000:]
            time.sleep(0.1)
        second = _driver(spec_path, store, "cli")
        _, err = second.communicate(timeout=300)
        assert second.returncode == 2, err[-2000:]
        assert len(err.strip().splitlines()) == 1 and err.startswith("mu-fast: error: store"), err
        assert f"is in use by another sweep (pid {first.pid} on" in err and str(store) in err
    finally:
        Path(f"{store}.go").write_text("1")
        _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    ids = [json.loads(x)["run_id"] for x in store.read_text().splitlines()]
    assert sorted(ids) == sorted(r.run_id for r in runs)  # every run exactly once: the second driver ran none

    # a driver killed while it holds the lock leaves the lock file behind; the next driver is not blocked by it
    store2 = tmp_path / "r2.jsonl"
    killed = _driver(spec_path, store2, "die")
    killed.communicate(timeout=300)
    assert killed.returncode == -9 and Path(f"{store2}.lock").read_text().split()[0] == str(killed.pid)
    result = sweep.run(SPEC, store=store2, progress=False)
    assert result.ok == len(runs) and not Path(f"{store2}.lock").exists()
