"""The results store: one JSON object per line, one line per finished (or failed) run, appended atomically.

Writing: each record is serialized to one line (``json.dumps`` escapes every newline inside strings), then written
with a single ``os.write`` on a file descriptor opened with ``O_APPEND``, under an exclusive ``fcntl.flock`` so that
writers in several processes (GPU workers, Ray actors on one machine) never interleave. Before writing, a writer that
finds the file not ending in a newline (a writer killed mid-line) first ends that torn line, so the new record
starts on its own line. ``fsync`` after each record (``fsync=False`` to skip: faster, but a power loss may lose
the last records; a killed process never does). A full disk (``ENOSPC``, ``EDQUOT``, ``EFBIG`` or a short write)
cuts the file back to where it was and raises ``StoreWriteError`` (one line: the store, the record's size, the fix);
the records already in the store are untouched.

One driver per store: ``Store.driver_lock()`` takes an advisory ``fcntl.flock`` on ``<store>.lock`` (holding the
driver's pid and host) for a sweep's whole duration; a second driver on the same store is refused at once with
``StoreInUseError`` naming the store and the pid that holds it. The kernel drops the lock when its process dies, so
the lock of a killed driver never blocks (its leftover file is reused); a driver that ends removes the file.

Reading: a line counts as a record only if it is UTF-8 JSON of an object with a ``run_id`` and a ``config`` whose
own ``run_id`` is the same (the engine writes ``config = RunConfig.to_dict()``). Every other non-blank line (torn,
garbage, not UTF-8, a record without config, a record whose ``run_id`` differs from its ``config.run_id``, e.g. a
copied line) is skipped: its run counts as not run (a sweep runs it, a report leaves it out), and one
``StoreDamageWarning`` per store names the store and says how many lines were skipped, why, and on which lines.
``Store.skipped`` counts them and ``Store.damage`` maps each reason to its line numbers. A run may have several
records (a failure, then a retry): ``latest()`` keeps the last one per run id.

Record format (``RECORD_FORMAT``)::

    {"format": 1, "run_id", "status": "ok" | "failed", "config": RunConfig.to_dict(), "metrics": {summary numbers},
     "before": {summary numbers of the unedited model}, "results": {"evals", "relearn", "latent_probes", ...},
     "localization": {method, components, trainable_params, budget, cached}, "edit": {optimizer, history, ...},
     "timings": {seconds per stage}, "session": {"load_seconds", "runs_before", "reloads"} (the worker's model),
     "provenance": mu_fast.provenance.provenance_block(...),
     "error": {"type", "message", "traceback"} (failed runs only)}
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import socket
import traceback
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

RECORD_FORMAT = 1
TRACEBACK_CHARS = 4000  # of a failed run's traceback, kept in its record (error_info)
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
SHOWN_LINES = 5


def error_info(err: BaseException) -> dict[str, Any]:
    """A failed record's ``error``: ``{"type", "message", "traceback"}`` of an exception (the traceback's last
    ``TRACEBACK_CHARS`` characters)."""
    text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    return {"type": type(err).__name__, "message": str(err), "traceback": text[-TRACEBACK_CHARS:]}


def cache_key(value: Any) -> str:
    """A JSON value as a dictionary key (sorted keys; what JSON cannot write, as ``str``)."""
    return json.dumps(value, sort_keys=True, default=str)


class StoreWriteError(OSError, ValueError):
    """A record could not be appended (disk full): the message says what to do. A ``ValueError`` too (as
    ``io.UnsupportedOperation`` is), so the command line prints it as one line."""


class StoreInUseError(ValueError):
    """Another driver holds the store's lock (module docstring)."""


class StoreDamageWarning(UserWarning):
    """Lines of a store were skipped (module docstring)."""


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


def record_problem(record: Any) -> str | None:
    """Why a parsed line is not a trusted record (module docstring), or None."""
    if not isinstance(record, dict) or not isinstance(record.get("run_id"), str) or not record["run_id"]:
        return "not a run record"
    config = record.get("config")
    if not isinstance(config, Mapping):
        return "with no config"
    if config.get("run_id") != record["run_id"]:
        return "whose run_id differs from its config.run_id"
    return None


def _parse(line: bytes) -> tuple[dict[str, Any] | None, str | None]:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return None, "not UTF-8"
    try:
        record = json.loads(text)
    except (ValueError, RecursionError):
        return None, "not JSON (torn or garbage)"
    problem = record_problem(record)
    return (None, problem) if problem else (record, None)


def _line_list(numbers: list[int]) -> str:
    shown = ", ".join(str(n) for n in numbers[:SHOWN_LINES])
    more = f" and {len(numbers) - SHOWN_LINES} more" if len(numbers) > SHOWN_LINES else ""
    return f"line{'s' * (len(numbers) > 1)} {shown}{more}"


class DriverLock:
    """The advisory lock of one sweep driver on a store (module docstring); ``release()`` or use as a context."""

    def __init__(self, store_path: Path):
        self.path = store_path.with_name(store_path.name + ".lock")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode("utf-8", "replace").split()
                os.close(fd)
                who = f"pid {holder[0]} on {holder[1]}" if len(holder) >= 2 else "another process"
                raise StoreInUseError(
                    f"store {str(store_path)!r} is in use by another sweep ({who}, lock {self.path.name}); wait "
                    "for it to end or pass another store (--out); a killed sweep never blocks") from None
            try:  # a driver that just ended may have removed the file we opened: lock the one at the path
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        self.fd: int | None = fd

    def release(self) -> None:
        """Remove the lock file (while still holding it, so no other driver holds a removed file) and unlock."""
        if self.fd is None:
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> DriverLock:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


class Store:
    """A JSON-lines results file (module docstring). ``Store(path)`` creates nothing until the first append."""

    def __init__(self, path: str | os.PathLike, fsync: bool = True):
        self.path = Path(path).expanduser()
        self.fsync = fsync
        self.skipped = 0
        self.damage: dict[str, list[int]] = {}
        self.lines = 0
        self._warned: object = None
        if self.path.exists() and not self.path.is_file():
            raise IsADirectoryError(f"store {str(self.path)!r} is not a file; pass a path for a .jsonl results file")

    def driver_lock(self) -> DriverLock:
        """Take this store's driver lock (module docstring); ``StoreInUseError`` if another driver holds it."""
        return DriverLock(self.path)

    def append(self, record: Mapping[str, Any]) -> None:
        """Append one record atomically (one ``os.write`` under the lock); ``StoreWriteError`` when the disk is full."""
        data = encode_record(record)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    data = b"\n" + data  # end a line torn by a killed writer; the reader skips that fragment
                self._write(fd, data, size)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _write(self, fd: int, data: bytes, size: int) -> None:
        try:
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(errno.ENOSPC, f"short write: {written} of {len(data)} bytes")
            if self.fsync:
                os.fsync(fd)
        except OSError as err:
            if err.errno not in DISK_FULL:
                raise
            try:
                os.ftruncate(fd, size)  # no half record left behind (we hold the lock)
            except OSError:
                pass
            reason = err.strerror or os.strerror(err.errno)
            raise StoreWriteError(
                err.errno, f"could not append a {len(data)}-byte record to store {str(self.path)!r} ({reason}); free "
                "space on that disk and rerun the same command: the runs already stored are kept and skipped") from None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.records())

    def records(self, warn: bool = True) -> list[dict[str, Any]]:
        """Every trusted record in file order; other lines are skipped (``skipped``, ``damage``) and, with ``warn``,
        reported once in a ``StoreDamageWarning``."""
        self.skipped, self.damage, self.lines = 0, {}, 0
        if not self.path.exists():
            return []
        out = []
        with open(self.path, "rb") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                self.lines += 1
                record, problem = _parse(line)
                if problem is None:
                    out.append(record)
                else:
                    self.damage.setdefault(problem, []).append(number)
        self.skipped = sum(len(v) for v in self.damage.values())
        if warn:
            self.warn_damage()
        return out

    def describe_damage(self) -> str:
        """What the last read skipped, e.g. ``2 not JSON (torn or garbage) (lines 3, 9)``; empty if nothing."""
        return ", ".join(f"{len(numbers)} {why} ({_line_list(numbers)})" for why, numbers in self.damage.items())

    def warn_damage(self) -> None:
        """One ``StoreDamageWarning`` naming the store and what the last read skipped (not repeated for the same)."""
        key = tuple((k, tuple(v)) for k, v in self.damage.items())
        if not self.skipped or key == self._warned:
            return
        self._warned = key
        warnings.warn(f"store {str(self.path)!r}: skipped {self.skipped} of {self.lines} lines: "
                      f"{self.describe_damage()}; they count as no record (a sweep runs their runs again, a "
                      "report leaves them out)",
                      StoreDamageWarning, stacklevel=3)

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
    """The latest record of every run in the store at ``path`` (``status``: only those, None: all). A store none of
    whose lines is a record (damaged, or not a store) is a ``ValueError`` that says what its lines are."""
    store = Store(path)
    if not store.path.is_file():
        raise FileNotFoundError(f"no results store at {str(store.path)!r}; run a sweep first (mu_fast.sweep.run)")
    latest: dict[str, dict[str, Any]] = {}
    for record in store.records(warn=False):
        latest[record["run_id"]] = record
    if not latest and store.skipped:
        raise ValueError(f"store {str(store.path)!r} holds no readable run record: all {store.lines} lines are "
                         f"damaged ({store.describe_damage()}); pass a sweep's .jsonl store, or rerun the sweep")
    store.warn_damage()
    return [r for r in latest.values() if status is None or r.get("status") == status]
