"""The results store: one JSON object per line, one line per finished (or failed) run, appended atomically.

Writing: each record is serialized to one line (``json.dumps`` escapes every newline inside strings), then written
with a single ``os.write`` on a file descriptor opened with ``O_APPEND``, under an exclusive ``fcntl.flock`` so that
writers in several processes (GPU workers, Ray actors on one machine) never interleave. Before writing, a writer that
finds the file not ending in a newline (a writer killed mid-line) first ends that torn line, so the new record
starts on its own line. ``fsync`` after each record (``fsync=False`` to skip: faster, but a power loss may lose
the last records; a killed process never does).

Reading: every line that parses as a JSON object with a ``run_id`` is a record; anything else (a torn last line, a
torn line ended by a later writer) is skipped and counted in ``Store.skipped``. A run may have several records (a
failure, then a retry): ``latest()`` keeps the last one per run id. Two sweeps started on one store at the same
time may both run a run (each reads the store when it starts); the file stays consistent and ``latest()`` keeps one.

Record format (``RECORD_FORMAT``)::

    {"format": 1, "run_id", "status": "ok" | "failed", "config": RunConfig.to_dict(), "metrics": {summary numbers},
     "before": {summary numbers of the unedited model}, "results": {"evals", "relearn", "latent_probes", ...},
     "localization": {method, components, trainable_params, budget, cached}, "edit": {optimizer, history, ...},
     "timings": {seconds per stage}, "session": {"load_seconds", "runs_before", "reloads"} (the worker's model),
     "provenance": mu_fast.provenance.provenance_block(...),
     "error": {"type", "message", "traceback"} (failed runs only)}
"""

from __future__ import annotations

import fcntl
import json
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

RECORD_FORMAT = 1


def _clean(value: Any) -> Any:
    """JSON-ready: NaN / inf become strings (strict JSON has no NaN), tensors and other objects their repr."""
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if hasattr(value, "tolist"):
        return _clean(value.tolist())
    return str(value)


def encode_record(record: Mapping[str, Any]) -> bytes:
    """One record as one line of UTF-8 JSON ending in a newline."""
    if not record.get("run_id"):
        raise ValueError("a store record needs a run_id; build records with the sweep engine")
    line = json.dumps(_clean(dict(record)), sort_keys=True, allow_nan=False, separators=(",", ":"))
    return (line + "\n").encode()


class Store:
    """A JSON-lines results file (module docstring). ``Store(path)`` creates nothing until the first append."""

    def __init__(self, path: str | os.PathLike, fsync: bool = True):
        self.path = Path(path).expanduser()
        self.fsync = fsync
        self.skipped = 0
        if self.path.exists() and not self.path.is_file():
            raise IsADirectoryError(f"store {str(self.path)!r} is not a file; pass a path for a .jsonl results file")

    def append(self, record: Mapping[str, Any]) -> None:
        """Append one record atomically (one ``os.write`` under the lock)."""
        data = encode_record(record)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    data = b"\n" + data  # end a line torn by a killed writer; the reader skips that fragment
                written = os.write(fd, data)
                if written != len(data):
                    raise OSError(f"short write to {self.path}: {written} of {len(data)} bytes (disk full?)")
                if self.fsync:
                    os.fsync(fd)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.records())

    def records(self) -> list[dict[str, Any]]:
        """Every readable record in file order (torn or foreign lines skipped, counted in ``skipped``)."""
        self.skipped = 0
        if not self.path.exists():
            return []
        out = []
        with open(self.path, "rb") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    self.skipped += bool(line.strip())
                    continue
                if isinstance(record, dict) and record.get("run_id"):
                    out.append(record)
                else:
                    self.skipped += 1
        return out

    def latest(self) -> dict[str, dict[str, Any]]:
        """The last record of each run id."""
        out: dict[str, dict[str, Any]] = {}
        for record in self.records():
            out[record["run_id"]] = record
        return out

    def finished(self, include_failed: bool = True) -> set[str]:
        """Run ids whose latest record is ``ok`` (and ``failed`` ones too, unless ``include_failed`` is False)."""
        statuses = ("ok", "failed") if include_failed else ("ok",)
        return {rid for rid, r in self.latest().items() if r.get("status") in statuses}


def load_results(path: str | os.PathLike, status: str | None = "ok") -> list[dict[str, Any]]:
    """The latest record of every run in the store at ``path`` (``status``: only those, None: all)."""
    store = Store(path)
    if not store.path.is_file():
        raise FileNotFoundError(f"no results store at {str(store.path)!r}; run a sweep first (mu_fast.sweep.run)")
    records = list(store.latest().values())
    return [r for r in records if status is None or r.get("status") == status]
