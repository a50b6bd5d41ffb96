"""Executors and their processes, on real sweeps of a tiny word-level checkpoint on the paper's sports facts:

* the workers of `mu-fast sweep --executor processes` (and the multiprocessing resource tracker) die with a SIGKILLed
  driver, whether they were running or still starting (the ``gpus`` executor is the same code with GPUs);
* Ctrl-C (SIGINT to the sweep's process group, as a terminal sends it) ends the sweep with one line, no traceback
  or library warning, and the store keeps every finished run;
* the demo's workers (``compare_localizations`` with workers=2: the processes executor) die with their driver too;
* a local Ray cluster listens on the loopback address only.

Processes are found by their parent's pid before the kill and told apart from a reused pid by their start time.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


# ------------------------------------------------------------------ processes, through /proc
def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state first), or None when the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _children(pid: int) -> dict[int, str]:
    """``{child pid: its start time}`` of the live children of ``pid``."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields and int(fields[1]) == pid and fields[0] != "Z":
                out[int(entry)] = fields[19]
    return out


def _descendants(pid: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields:
                parents.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _alive(pid: int, start: str) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[19] == start and fields[0] not in ("Z", "X")


def _wait_gone(processes: dict[int, str], seconds: float) -> dict[int, str]:
    """Poll until none of ``processes`` is alive or ``seconds`` pass; return those still alive (then SIGKILLed, so
    that a failing test leaves nothing behind)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(_alive(p, s) for p, s in processes.items()):
        time.sleep(0.2)
    left = {p: s for p, s in processes.items() if _alive(p, s)}
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


def _wait_for(condition, seconds: float, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the driver ended (exit {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {seconds} s")
        time.sleep(0.05)


# ------------------------------------------------------------------ the mechanism itself
ARMED = """
import ctypes, os, signal, sys
from mu_fast.worker_lifetime import die_with_parent
die_with_parent(int(sys.argv[1]))
prctl = ctypes.CDLL(None).prctl
got = ctypes.c_int(-1)
prctl(2, ctypes.byref(got), 0, 0, 0)  # PR_GET_PDEATHSIG
print(got.value == signal.SIGKILL)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_die_with_parent_arms_the_signal_or_exits_when_the_parent_is_gone():
    armed = subprocess.run([sys.executable, "-c", ARMED, str(os.getpid())], env=_env(), capture_output=True,
                           text=True, timeout=120)
    assert (armed.returncode, armed.stdout.strip()) == (0, "True"), armed.stderr[-2000:]
    # a parent that is not this process's any more (it died before the worker got there): exit at once
    orphan = subprocess.run([sys.executable, "-c", ARMED, str(os.getpid() + 10**6)], env=_env(), capture_output=True,
                            text=True, timeout=120)
    assert (orphan.returncode, orphan.stdout) == (1, ""), orphan.stderr[-2000:]


# ------------------------------------------------------------------ a small sweep
@pytest.fixture(scope="module")
def spec(tmp_path_factory, data_dir) -> Path:
    """A sweep of 24 runs (about a second each) of a tiny random Llama with a word tokenizer, with relearning (the
    path where the libraries warn)."""
    from mu_fast.data import load_sports_task
    from tests._tiny_task import word_checkpoint

    folder = tmp_path_factory.mktemp("lifetime")
    checkpoint = word_checkpoint(folder / "ckpt", [load_sports_task("first_16_unsplit")], layers=2)
    data = {"name": "lifetime", "models": [{"name": str(checkpoint), "dtype": "fp32"}],
            "tasks": [{"dataset": "sports"}], "methods": ["all_mlps", "random"],
            "edit": {"lm_coef": 0, "steps": 30, "lr": [1e-3, 3e-3, 1e-2], "maintain_batch": 16},
            "seeds": [0, 1, 2, 3],
            "evaluations": {"formats": ["normal"], "batch_size": 256,
                            "relearn": {"steps": 2, "lora_rank": 4, "batch_size": 4}}}
    path = folder / "spec.json"
    path.write_text(json.dumps(data))
    return path


def _start_sweep(spec: Path, store: Path, logs: Path) -> subprocess.Popen:
    """`mu-fast sweep --executor processes --workers 2` in its own process group, output to files (a pipe would be
    held open by the workers)."""
    cmd = [sys.executable, "-m", "mu_fast.cli", "sweep", str(spec), "--out", str(store), "--threads", "1",
           "--executor", "processes", "--workers", "2"]
    with open(logs / "out.txt", "wb") as out, open(logs / "err.txt", "wb") as err:
        # SIGINT at its default, as a shell starts a program: an earlier test of the same pytest process may have left
        # SIGINT ignored, and a Python started with SIGINT ignored keeps ignoring it (the driver then never saw Ctrl-C
        # and ran every run, in full suites only).
        return subprocess.Popen(cmd, env=_env(), stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=logs,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _records(store: Path) -> int:
    return store.read_bytes().count(b"\n") if store.exists() else 0


def _sweep_children(pid: int) -> tuple[dict[int, str], dict[int, str]]:
    """(workers, resource trackers) among the children of ``pid``."""
    children = _children(pid)
    workers = {p: s for p, s in children.items() if "spawn_main" in _cmdline(p)}
    trackers = {p: s for p, s in children.items() if "resource_tracker" in _cmdline(p)}
    return workers, trackers


@pytest.mark.parametrize("when", ["running", "starting"])
def test_workers_die_with_a_killed_driver(spec, tmp_path, when):
    """SIGKILL the driver once its workers have run a run ("running": the parent-death signal), or as soon as they
    exist ("starting": they die once started, finding their parent gone). Without the fix they were reparented to
    init and waited for runs forever."""
    store = tmp_path / "s.jsonl"
    proc = _start_sweep(spec, store, tmp_path)
    try:
        _wait_for(lambda: len(_sweep_children(proc.pid)[0]) == 2, 300, proc, "2 worker processes")
        if when == "running":
            _wait_for(lambda: _records(store) >= 1, 300, proc, "finished run")
        workers, trackers = _sweep_children(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert len(workers) == 2
    # a running worker dies at once; a starting one after its interpreter has started (it imports torch first)
    left = _wait_gone({**workers, **trackers}, 10 if when == "running" else 90)
    assert not left, {p: _cmdline(p) for p in left}


def test_ctrl_c_ends_a_process_sweep_with_one_line_and_keeps_the_store(spec, tmp_path):
    from mu_fast.sweep import Store, expand
    from mu_fast.sweep.engine import pending_runs

    store = tmp_path / "s.jsonl"
    # 96 runs: Ctrl-C comes after the first record, and on a loaded machine the test's polling can lag the workers
    # by seconds; with the fixture's 24 the sweep had twice finished before the signal (nothing left to interrupt).
    long_spec = tmp_path / "long_spec.json"
    long_spec.write_text(json.dumps({**json.loads(spec.read_text()), "seeds": list(range(16))}))
    spec = long_spec
    proc = _start_sweep(spec, store, tmp_path)
    try:
        _wait_for(lambda: _records(store) >= 1, 300, proc, "finished run")
        workers, trackers = _sweep_children(proc.pid)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = (tmp_path / "out.txt").read_text(errors="replace")
    err = (tmp_path / "err.txt").read_text(errors="replace")
    everything = out + err
    for word in ("Traceback", "KeyboardInterrupt", "FutureWarning", "Warning", "Aborted"):
        assert word not in everything, everything[-3000:]
    lines = [line for chunk in err.split("\r") for line in chunk.splitlines() if line.strip()]
    # mu_fast's own lines (not the progress bar's redraws, nor a library's log line such as bitsandbytes' note on
    # CPUs with AVX512-BF16, printed by a worker that imports it whether or not the sweep is interrupted)
    ours = [line for line in lines if line.startswith("mu-fast")]
    assert len(ours) == 1 and ours[0].startswith("mu-fast: sweep interrupted: "), lines[-5:]
    assert not [line for line in lines if "nterrupt" in line and line != ours[0]], lines[-5:]
    assert proc.returncode == 130
    runs = expand(str(spec))
    records = [json.loads(line) for line in store.read_text().splitlines()]  # every line a whole record
    assert 1 <= len(records) < len(runs) and all(r["status"] == "ok" for r in records)
    assert f"keeps {len(records)} of the {len(runs)} runs; run the same command again to run the other " \
           f"{len(runs) - len(records)}" in ours[0]
    assert len(pending_runs(runs, Store(store))) == len(runs) - len(records)  # a rerun resumes from there
    assert not _wait_gone({**workers, **trackers}, 10)


# ------------------------------------------------------------------ the demo's worker pool
POOL_DRIVER = r"""
import sys
from mu_fast.edit import EditConfig
from mu_fast.models.tiny import make_tiny_model
from mu_fast.pipeline import RunOptions, compare_localizations
from tests._tiny_task import tiny_task, word_tokenizer

if __name__ == "__main__":
    tok = word_tokenizer()
    model = make_tiny_model("llama", vocab_size=len(tok), num_hidden_layers=3, initializer_range=0.3)
    # "random" runs take a second, "all_mlps" runs minutes: once a "random" result is written, both workers are
    # past their start-up and at least one is in a long run
    configs = {"random": EditConfig(steps=2, lr=1e-2, lm_batch=4, maintain_batch=8),
               "all_mlps": EditConfig(steps=50000, lr=1e-2, lm_batch=4, maintain_batch=8)}
    compare_localizations(model, tok, tiny_task(), list(configs), configs, RunOptions(relearn=False, probes=False),
                          out_dir=sys.argv[1], progress=False, allow_unknown_facts=True, seeds=(0, 1), workers=2)
"""


def test_the_demo_worker_pool_dies_with_its_driver(tmp_path):
    """Without the fix a worker of the killed driver went on with its run (minutes here) at full speed."""
    script, out = tmp_path / "pool_driver.py", tmp_path / "runs"
    script.write_text(POOL_DRIVER)
    with open(tmp_path / "err.txt", "wb") as err:
        proc = subprocess.Popen([sys.executable, str(script), str(out)], env=_env(), cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    try:
        _wait_for(lambda: (out / "runs.jsonl").is_file() and '"random"' in (out / "runs.jsonl").read_text(), 300, proc,
                  "a finished run")
        time.sleep(2)
        workers, trackers = _sweep_children(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert len(workers) == 2
    left = _wait_gone({**workers, **trackers}, 10)
    assert not left, {p: _cmdline(p) for p in left}


# ------------------------------------------------------------------ Ray
def _listening() -> dict[str, tuple[str, int]]:
    """``{socket inode: (address, port)}`` of the TCP sockets in LISTEN state (/proc/net/tcp and tcp6)."""
    out = {}
    for name, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        try:
            rows = Path(f"/proc/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] != "0A":  # TCP_LISTEN
                continue
            address, port = fields[1].split(":")
            raw = bytes.fromhex(address)
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # each 32-bit word is host-endian
            out[fields[9]] = (socket.inet_ntop(family, raw), int(port, 16))
    return out


def _sockets_of(pids: list[int]) -> list[tuple[int, str, str, int]]:
    """``(pid, command line, address, port)`` of every listening socket these processes hold."""
    listening, found = _listening(), []
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            inode = link[len("socket:["):-1] if link.startswith("socket:[") else None
            if inode in listening:
                found.append((pid, _cmdline(pid), *listening[inode]))  # whole: a long install path must not cut it
    return found


def _loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)


def test_local_ray_cluster_listens_on_loopback_only(spec, tmp_path):
    """During a local Ray sweep (after its first record: the cluster, its agents and the actor are up), every
    listening socket of this process and its descendants (GCS, raylet, agents, workers) is on the loopback address;
    before the fix they were on every interface (``::``/``0.0.0.0``) or the machine's address."""
    pytest.importorskip("ray")
    import mu_fast.sweep as sweep

    seen: list[tuple[int, str, str, int]] = []

    def look(record):
        if not seen:
            seen.extend(_sockets_of([os.getpid(), *_descendants(os.getpid())]))

    data = {**json.loads(spec.read_text()), "methods": ["all_mlps"], "seeds": [0], "edit": {"lm_coef": 0, "steps": 2,
                                                                                              "lr": [1e-3, 3e-3]}}
    data["evaluations"] = {"formats": ["normal"]}
    try:
        result = sweep.run(data, store=tmp_path / "r.jsonl", executor="ray", workers=1, threads=1, progress=False,
                           on_record=look)
    except RuntimeError as err:
        if "could not start a local Ray cluster" in str(err):
            pytest.skip(str(err))
        raise
    assert (result.ok, result.failed) == (2, 0), [r.get("error") for r in result.records]
    assert any("gcs_server" in cmd for _, cmd, _, _ in seen), seen  # the listing saw Ray's own servers
    wide = [s for s in seen if not _loopback(s[2])]
    assert not wide, wide
