"""Every command that runs many runs writes sweep records and, SIGKILLed partway, resumes from its store.

Each case starts the command in its own process group, waits for its first record, kills the group with SIGKILL
(no handler runs: what an OOM kill or a lost machine does), then runs the same command again to the end. The store
keeps every line written before the kill unchanged, ends with every run exactly once (nothing that had finished is
recomputed), and the report printed at the end is the same as an uninterrupted run's in another folder.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--steps", "2", "--maintain-batch", "8", "--lm-batch", "2"]


def _env(cache_root: Path) -> dict[str, str]:
    env = {**os.environ, "MU_FAST_CACHE_DIR": str(cache_root), "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("MU_FAST_DEBUG", None)
    return env


def _lines(store: Path) -> list[str]:
    return store.read_text().splitlines() if store.is_file() else []


CLI = [sys.executable, "-m", "mu_fast.cli"]


def _command(args: list[str], cache_root: Path, log: Path, program: list[str] = CLI) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen([*program, *args], env=_env(cache_root), cwd=REPO, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _finish(args: list[str], cache_root: Path, log: Path, pids: list[int] | None = None,
            program: list[str] = CLI) -> str:
    proc = _command(args, cache_root, log, program)
    if pids is not None:
        pids.append(proc.pid)
    assert proc.wait(timeout=900) == 0, log.read_text()[-3000:]
    return log.read_text()


def _kill_after_first_record(args: list[str], store: Path, cache_root: Path, log: Path,
                             program: list[str] = CLI) -> list[str]:
    proc = _command(args, cache_root, log, program)
    try:
        deadline = time.monotonic() + 600
        while not _lines(store):
            if proc.poll() is not None:
                pytest.fail(f"the command ended (exit {proc.returncode}) before its first record: "
                            f"{log.read_text()[-2000:]}")
            assert time.monotonic() < deadline, "no record within 600 s"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    return _lines(store)


def _table(output: str, start: str, end: str) -> str:
    """The report's table: from its heading line to the line that starts ``end``."""
    lines = output.splitlines()
    first = next(i for i, line in enumerate(lines) if start in line)
    last = next(i for i in range(first, len(lines)) if lines[i].startswith(end))
    return "\n".join(lines[first:last])


def _check_resumed(kept: list[str], store: Path, total: int) -> list[dict]:
    final = _lines(store)
    assert 1 <= len(kept) < total, f"the kill came after {len(kept)} of {total} records"
    # (a record torn by the kill would be the last kept line; the store names and skips it, and the rerun redoes it)
    whole = [line for line in kept if line.endswith("}")]
    assert final[:len(whole)] == whole  # nothing written before the kill was rewritten
    records = [json.loads(line) for line in final if line.strip()]
    ok = [r for r in records if r.get("status") == "ok"]
    assert len(ok) == total and len({r["run_id"] for r in ok}) == total  # each run once: none recomputed
    return ok


def _case(args: list[str], store_name: str, total: int, table: tuple[str, str] | None, tmp_path: Path,
          cache_root: Path) -> list[dict]:
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    kept = _kill_after_first_record([*args, "--out", str(killed)], killed / store_name, cache_root,
                                    tmp_path / "first.log")
    resumed = _finish([*args, "--out", str(killed)], cache_root, tmp_path / "resumed.log")
    ok = _check_resumed(kept, killed / store_name, total)
    if table is not None:
        reference = _finish([*args, "--out", str(clean)], cache_root, tmp_path / "clean.log")
        assert _table(resumed, *table) == _table(reference, *table)
    return ok


def test_demo_resumes_after_sigkill(ci_organism, cache_root, tmp_path):
    args = ["demo", "--preset", "ci", "--edit-preset", "default", "--methods", "flu,random", "--seeds", "0,1,2,3",
            *SMALL, "--relearn-steps", "1", "--relearn-lora-rank", "4", "--no-probes", "--workers", "1", "--executor",
            "local"]
    ok = _case(args, "runs.jsonl", 8, ("mean±std over 4 seeds", "Components:"), tmp_path, cache_root)
    assert {r["config"]["model"]["ref"] for r in ok} == {"organism:ci"}


def test_run_resumes_after_sigkill(ci_organism, cache_root, tmp_path):
    args = ["run", "organism:ci", "--methods", "atp,random", "--seeds", "0,1,2,3", *SMALL, "--no-relearn",
            "--no-probes"]
    _case(args, "runs.jsonl", 8, ("mean±std over 4 seeds", "Components:"), tmp_path, cache_root)


def test_the_lr_rule_sweep_resumes_after_sigkill(ci_organism, cache_root, tmp_path):
    """``demo --choose-lr``: the rule's sweep (methods x lrs x the rule's seeds) is the store that resumes; the
    choice made after the resume equals an uninterrupted run's."""
    from mu_fast.organism.lr_choice import DEMO_LR_SEEDS

    args = ["demo", "--preset", "ci", "--methods", "flu,random", "--choose-lr", "--lr-grid", "3e-3,3e-2", "--seeds",
            "0", *SMALL, "--no-relearn", "--no-probes", "--workers", "1", "--executor", "local"]
    _case(args, "lr_sweep.jsonl", 2 * 2 * len(DEMO_LR_SEEDS), None, tmp_path, cache_root)
    _finish([*args, "--out", str(tmp_path / "clean")], cache_root, tmp_path / "clean.log")
    killed = json.loads((tmp_path / "killed" / "lr_choice.json").read_text())
    clean = json.loads((tmp_path / "clean" / "lr_choice.json").read_text())
    assert killed["choices"] == clean["choices"]


def test_the_paper_preset_resumes_after_sigkill(data_dir, cache_root, tmp_path):
    from tests.test_cli_run import _sports_checkpoint

    ckpt = _sports_checkpoint(tmp_path / "ckpt", layers=5)
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(f"text {i} about the sport of basketball" for i in range(2048)))
    args = ["run", str(ckpt), "--preset", "paper", "--paper-model", "llama-3-8b", "--dataset", "sports",
            "--experiment", "forget_16", "--methods", "paper:flu,random_mlps,all_mlps,nonlocalized", *SMALL,
            "--dtype", "fp32", "--no-relearn", "--no-probes", "--paper-evals", "none", "--lm-texts", str(texts)]
    _case(args, "paper_sports_llama-3-8b_forget_16.jsonl", 4, None, tmp_path, cache_root)


def test_the_demo_runs_on_ray_with_the_same_table(ci_organism, cache_root, tmp_path):
    """``mu-fast demo --executor ray``: the runs go to Ray actors (a local cluster) and the table is the one the local
    executor prints."""
    pytest.importorskip("ray")
    args = ["demo", "--preset", "ci", "--edit-preset", "default", "--methods", "flu,random", "--seeds", "0,1",
            *SMALL, "--no-relearn", "--no-probes", "--workers", "1"]
    driver: list[int] = []
    on_ray = _finish([*args, "--executor", "ray", "--out", str(tmp_path / "ray")], cache_root, tmp_path / "ray.log",
                     driver)
    local = _finish([*args, "--executor", "local", "--out", str(tmp_path / "local")], cache_root, tmp_path / "l.log")
    table = ("mean±std over 2 seeds", "Components:")
    assert _table(on_ray, *table) == _table(local, *table)
    records = [json.loads(line) for line in (tmp_path / "ray" / "runs.jsonl").read_text().splitlines()]
    assert len(records) == 4 and {r["status"] for r in records} == {"ok"}
    assert driver[0] not in {r["provenance"]["host"]["pid"] for r in records}  # run by an actor, not the driver


SEQUENCE_DRIVER = r"""
import json, sys
import torch
torch.set_num_threads(1)
import tests.sweep._sequential_setup as setup
from mu_fast import sweep

if __name__ == "__main__":
    setup.install()
    sweep.run(json.loads(open(sys.argv[1]).read()), store=sys.argv[2], progress=False, threads=1)
"""


def test_a_sequential_counterfact_sweep_resumes_after_sigkill(data_dir, cache_root, tmp_path):
    """``kind: sequential`` (run --preset paper's sequential CounterFact): killed after its first step records, the
    rerun replays the recorded steps' edits (no evaluation, no record) and records only the missing steps, whose
    numbers are an uninterrupted run's."""
    import tests.sweep._sequential_setup as setup

    ckpt = setup.checkpoint(tmp_path / "ckpt", layers=20)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(setup.spec(ckpt, ["all_mlps", "random"], steps=2)))
    script = tmp_path / "driver.py"
    script.write_text(SEQUENCE_DRIVER)
    killed, clean = tmp_path / "killed.jsonl", tmp_path / "clean.jsonl"
    program = [sys.executable, str(script), str(spec)]
    kept = _kill_after_first_record([str(killed)], killed, cache_root, tmp_path / "first.log", program)
    _finish([str(killed)], cache_root, tmp_path / "resumed.log", program=program)
    _finish([str(clean)], cache_root, tmp_path / "clean.log", program=program)
    ok = _check_resumed(kept, killed, 8)  # 2 sequences x 4 partition steps
    reference = {r["run_id"]: r for r in (json.loads(line) for line in _lines(clean))}
    for record in ok:
        for key, value in record["metrics"].items():
            if key != "seconds":
                assert reference[record["run_id"]]["metrics"][key] == pytest.approx(value, abs=1e-6), key
    whole = {json.loads(line)["run_id"] for line in kept if line.endswith("}")}
    resumed = [r for r in ok if r["run_id"] not in whole]
    if len(whole) % 4:  # killed inside a sequence: its first resumed step replayed the recorded ones
        assert resumed[0]["sequence"]["replayed"] == len(whole) % 4
