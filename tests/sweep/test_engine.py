"""The sweep engine on the CI organism: records with provenance, restore between runs, failures recorded and
retried, a killed sweep resumed with nothing lost or repeated (in-process, and `mu-fast sweep --executor ray` on a
local cluster with 2 workers, SIGKILLed and restarted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import mu_fast.sweep as sweep
from mu_fast.sweep import evaluations
from mu_fast.sweep.session import ModelSession, _check_finite
from mu_fast.sweep.snapshot import fingerprint

REPO = Path(__file__).resolve().parents[2]
CI_SPEC = REPO / "specs" / "ci_organism.yaml"


def tiny_spec(**overrides):
    spec = {
        "name": "tiny",
        "models": ["organism:ci"],
        "tasks": [{"dataset": "organism", "forget_splits": ["first_16_unsplit"]}],
        "methods": ["flu", "random"],
        "edit": {"preset": "organism", "steps": 3, "lr": [3e-3, 1e-2], "maintain_batch": 16, "lm_batch": 4},
        "seeds": [0],
        "evaluations": {"formats": ["normal", "mcq"], "batch_size": 128, "relearn": {"steps": 1, "lora_rank": 4,
                                                                                       "batch_size": 4},
                        "probes": {"steps": 10}},
    }
    spec.update(overrides)
    return spec


def test_session_restores_the_model_and_repeats_runs_exactly(organism_cache):
    runs = sweep.expand(tiny_spec())
    session = ModelSession(runs[0].model)
    start = fingerprint(session.model)
    first = [session.execute(r) for r in runs]
    assert [r["status"] for r in first] == ["ok"] * 4, [r.get("error") for r in first]
    assert fingerprint(session.model) == start  # every edit undone through its mask
    # the second lr of a method reuses the localization; a run repeated after others gives the same numbers
    assert [r["localization"]["cached"] for r in first] == [False, True, False, True]
    again = session.execute(runs[0])
    assert again["metrics"] == {**first[0]["metrics"], "seconds": again["metrics"]["seconds"]}
    record = first[1]
    prov = record["provenance"]
    assert prov["versions"]["torch"] and prov["device"]["type"] == "cpu" and "commit" in (prov["git"] or {"commit": 0})
    assert prov["model"]["organism_hash"] == runs[0].model["organism_hash"] and prov["model"]["config_hash"]
    assert record["config"]["run_id"] == record["run_id"] == runs[1].run_id
    assert {"edit", "evaluate", "relearn", "probes", "restore", "total"} <= set(record["timings"])
    assert 0 < record["metrics"]["maintain_acc"] <= 1 and "relearn_acc" in record["metrics"]
    assert record["before"]["forget_err"] < 0.2 and record["localization"]["trainable_params"] > 0


def _flaky(model, tokenizer, task, settings, seed):
    if seed == 1 and os.environ.get("SWEEP_TEST_FAIL") == "1":
        raise RuntimeError("flaky evaluation failed on purpose")
    return {"seed": seed}


def test_failed_runs_are_recorded_and_retried(organism_cache, tmp_path, monkeypatch):
    evaluations.register_evaluation("flaky", _flaky)
    try:
        spec = tiny_spec(methods=["flu"], edit={"preset": "organism", "steps": 2, "lr": 3e-3, "lm_batch": 4},
                         seeds=[0, 1], evaluations={"formats": ["normal"], "flaky": True})
        store = tmp_path / "r.jsonl"
        monkeypatch.setenv("SWEEP_TEST_FAIL", "1")
        result = sweep.run(spec, store=store, progress=False)
        assert (result.ok, result.failed) == (1, 1)
        failed = next(r for r in sweep.load_results(store, status=None) if r["status"] == "failed")
        assert failed["error"]["type"] == "RuntimeError" and "on purpose" in failed["error"]["message"]
        assert "_flaky" in failed["error"]["traceback"] and failed["config"]["seed"] == 1
        assert sweep.run(spec, store=store, progress=False).skipped == 2  # a failure counts as done ...
        monkeypatch.setenv("SWEEP_TEST_FAIL", "0")
        started = []
        retried = sweep.run(spec, store=store, retry_failed=True, progress=False, on_run_start=started.append)
        assert [r.seed for r in started] == [1] and (retried.ok, retried.failed) == (1, 0)  # ... until retried
        assert {r["config"]["seed"] for r in sweep.load_results(store)} == {0, 1}
        assert sweep.load_results(store)[1]["results"]["flaky"] == {"seed": 1}
    finally:
        evaluations.REGISTRY.pop("flaky", None)


def test_a_model_that_fails_to_load_fails_its_runs_and_the_sweep_goes_on(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    spec = {"models": [str(broken)], "tasks": [{"dataset": "sports"}], "methods": ["flu", "all_mlps"],
            "edit": {"lm_coef": 0}}
    result = sweep.run(spec, store=tmp_path / "r.jsonl", progress=False)
    assert (result.ok, result.failed) == (0, 2)
    assert all(r["error"]["stage"] == "model load" for r in result.records)


def test_non_finite_numbers_fail_the_run():
    with pytest.raises(FloatingPointError, match="forget_loss is nan at step 3"):
        _check_finite("edit", {"forget_loss": float("nan")}, 3)


KILLER = """
import os, signal, sys, threading
import mu_fast.sweep as sweep
count = [0]
def start(run):
    count[0] += 1
    if count[0] == int(sys.argv[2]) + 1:  # kill in the middle of the next run
        threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGKILL)).start()
sweep.run(sys.argv[1], store=sys.argv[3], progress=False, threads=1, on_run_start=start)
"""


def test_killed_sweep_resumes_without_losing_or_repeating_runs(organism_cache, tmp_path):
    store = tmp_path / "ci.jsonl"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done_before_kill = 5
    proc = subprocess.run([sys.executable, "-c", KILLER, str(CI_SPEC), str(done_before_kill), str(store)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]
    first = store.read_bytes()
    assert len(sweep.load_results(store)) == done_before_kill
    resumed = sweep.run(CI_SPEC, store=store, progress=False, threads=1)
    runs = sweep.expand(CI_SPEC)
    assert len(runs) >= 12 and resumed.skipped == done_before_kill
    assert resumed.ok == len(runs) - done_before_kill and resumed.failed == 0
    assert store.read_bytes().startswith(first)  # finished records untouched
    ids = [json.loads(line)["run_id"] for line in store.read_bytes().splitlines()]
    assert sorted(ids) == sorted(r.run_id for r in runs)  # every run exactly once


def _cli_sweep(store, executor_args, env):
    """``mu-fast sweep specs/ci_organism.yaml`` as a subprocess in its own process group (Ray's helpers with it)."""
    cmd = [sys.executable, "-m", "mu_fast.cli", "sweep", str(CI_SPEC), "--out", str(store), "--threads", "1",
           *executor_args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def _lines(path):
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_ray_sweep_killed_by_sigkill_resumes_without_losing_or_repeating_runs(organism_cache, tmp_path):
    """The Done-when of the sweep CLI: `mu-fast sweep --executor ray` on a local cluster with 2 workers, the driver
    SIGKILLed once the store holds some but not all records, then restarted: every run exactly once. Runs in CI
    (ray is a requirement; CPU only)."""
    import signal
    import time

    runs = sweep.expand(CI_SPEC)
    assert len(runs) >= 12
    store = tmp_path / "ray.jsonl"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = _cli_sweep(store, ["--executor", "ray", "--workers", "2"], env)
    try:
        deadline = time.monotonic() + 400
        while _lines(store) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)  # the driver only: its actors and Ray's processes are orphaned
        proc.wait(timeout=60)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # Ray's helpers it started (same process group), leaving none behind
        except ProcessLookupError:
            pass
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    first = store.read_bytes()
    done = len(sweep.load_results(store, status=None))
    assert 0 < done < len(runs)

    again = _cli_sweep(store, ["--executor", "ray", "--workers", "2"], env)
    try:
        _, err = again.communicate(timeout=500)
    finally:
        try:
            os.killpg(again.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert again.returncode == 0, err.decode()[-2000:]
    assert store.read_bytes().startswith(first)  # the finished records are untouched
    records = sweep.load_results(store, status=None)
    ids = [r["run_id"] for r in records]
    assert len(ids) == len(set(ids)) == len(runs) and set(ids) == {r.run_id for r in runs}
    assert all(r["status"] == "ok" for r in records), [r.get("error") for r in records]
    # Ray actors ran them, at most 2 per driver, never the driver (an actor that loads slower may get no run)
    for part, driver in ((records[:done], proc.pid), (records[done:], again.pid)):
        workers = {r["provenance"]["host"]["pid"] for r in part}
        assert 1 <= len(workers) <= 2 and driver not in workers
    assert all(r["session"]["reloads"] == 0 for r in records)


def test_worker_processes_share_the_runs(organism_cache, tmp_path):
    spec = tiny_spec(methods=["flu"], edit={"preset": "organism", "steps": 2, "lr": [3e-3, 1e-2], "lm_batch": 4},
                     evaluations={"formats": ["normal"]})
    result = sweep.run(spec, store=tmp_path / "p.jsonl", executor="processes", workers=2, threads=1, progress=False)
    assert (result.ok, result.failed) == (2, 0), [r.get("error") for r in result.records]
    pids = {r["provenance"]["host"]["pid"] for r in result.records}
    assert len(pids) == 2 and os.getpid() not in pids


def test_gpu_executor_needs_gpus(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has GPUs (the GPU run is test_gpu_executor_one_worker_per_gpu)")
    with pytest.raises(ValueError, match="executor='gpus' needs CUDA GPUs"):
        sweep.run(tiny_spec(), store=tmp_path / "g.jsonl", executor="gpus", progress=False)
    assert not (tmp_path / "g.jsonl").exists()


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU (GPU-only check)")
def test_gpu_executor_one_worker_per_gpu(organism_cache, tmp_path):
    import torch

    result = sweep.run(tiny_spec(), store=tmp_path / "g.jsonl", executor="gpus", progress=False)
    assert result.failed == 0 and result.ok == 4
    devices = {(r["provenance"]["device"]["type"], r["provenance"]["device"]["cuda_visible_devices"])
               for r in result.records}
    assert {d[0] for d in devices} == {"cuda"} and len(devices) == min(torch.cuda.device_count(), 4)


def test_sweep_of_a_local_checkpoint_on_sports(tmp_path, data_dir):
    """A save_pretrained folder (a tiny random Llama with a word tokenizer of the sports prompts) on the paper's
    sports facts: the checkpoint and sports paths of the engine, without the organism."""
    from mu_fast.data import load_sports_task
    from tests._tiny_task import word_checkpoint

    checkpoint = word_checkpoint(tmp_path / "ckpt", [load_sports_task("first_16_unsplit")], layers=2)
    spec = {"models": [{"name": str(checkpoint), "dtype": "fp32"}], "tasks": [{"dataset": "sports"}],
            "methods": ["flu", "all_mlps"], "edit": {"lm_coef": 0, "steps": 2, "lr": 1e-3, "maintain_batch": 16},
            "evaluations": {"formats": ["normal", "mcq"], "batch_size": 256}}
    result = sweep.run(spec, store=tmp_path / "r.jsonl", progress=False)
    assert (result.ok, result.failed) == (2, 0), [r.get("error") for r in result.records]
    model = result.records[0]["provenance"]["model"]
    assert model["kind"] == "checkpoint" and model["path"] == str(checkpoint.resolve()) and model["config_hash"]
    assert {r["results"]["evals"]["normal"]["forget"]["n"] for r in result.records} == {16}
