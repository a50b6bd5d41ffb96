"""Checks the command line runs before any slow work: names, options, paths, outputs and the hub.

Every check raises ``ValueError`` / ``FileNotFoundError`` / ``FileExistsError`` / ``OutputError`` with one sentence
that names the command-line option at fault and the fix (``mu_fast.cli.main`` prints it as one line). Nothing here
imports torch or transformers, so a bad option is reported in well under a second, not after a model has loaded.

Outputs: every command checks each output path with ``check_writable`` before it loads anything (a file is created
and removed again in the nearest existing folder, so a read-only mount, a parent that is a file or a path under
``/sys`` is refused at once and no folder is left behind), and wraps its final writes in ``writing_output``, which
turns a filesystem error there (read-only, permission, disk full, ...) into one line that says what was kept.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

# How long the hub may take to accept a TCP connection before the process goes offline.
HUB_CHECK_SECONDS = 3.0
DEFAULT_HUB_ENDPOINT = "https://huggingface.co"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
ORGANISM_PRESETS = ("demo", "ci")


def check_choice(option: str, value: str, choices: Iterable[str]) -> str:
    """``value`` if it is one of ``choices``, else a ValueError naming ``option`` and listing the choices."""
    choices = tuple(choices)
    if value not in choices:
        import difflib

        close = difflib.get_close_matches(value, choices, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ValueError(f"{option} {value!r} is not known{hint}; choose one of: {', '.join(choices)}")
    return value


def check_positive(option: str, value: float | int | None, integer: bool = False) -> None:
    """A ValueError naming ``option`` unless ``value`` is None or a positive finite number."""
    if value is None:
        return
    import math

    if integer and int(value) != value or not math.isfinite(value) or value <= 0:
        kind = "integer" if integer else "number"
        raise ValueError(f"{option} must be a positive {kind}; got {value}")


def check_output(option: str, paths: Sequence[Path], overwrite: bool) -> None:
    """Refuse outputs that already exist unless ``--overwrite`` was given (before any work is done)."""
    existing = [str(p) for p in paths if Path(p).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{option}: {', '.join(existing)} already exists; pass --overwrite to replace it, "
                              f"or choose another {option}")


# Filesystem errors a user can cause or fix when writing results (read-only mount, permissions, a path through a
# file, a full disk or quota, a file too large, a folder removed meanwhile, a name too long).
WRITE_ERRNOS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.ENOSPC,
                          errno.EDQUOT, errno.EFBIG, errno.ENOENT, errno.ENAMETOOLONG})


class OutputError(OSError):
    """An output that cannot be written (``check_writable``, ``writing_output``): a user error, printed as one line."""

    def __str__(self) -> str:  # OSError's own str() would prefix "[Errno n]"
        return str(self.args[0]) if self.args else ""


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # e.g. a folder we may not search: treat it as there (the probe below then fails)
        return True


def check_writable(option: str, path: str | os.PathLike, folder: bool = False, append: bool = False,
                   fix: str | None = None) -> Path:
    """Refuse an output path that cannot be written, before any slow work: ``OutputError`` naming ``option``,
    the path and the fix. ``folder``: the output is a folder (written into), else a file (written beside, through a
    temporary name; ``append``: an existing file is also opened for appending, as a sweep store is). The check
    creates and removes a file in the nearest existing folder (the output folder itself when it exists), so it
    leaves nothing behind and sees what a write would see (read-only mounts, permissions, ``/sys``), whoever runs
    it (root included). fix: how to choose another path (default "choose another <option>")."""
    given = str(path)
    fix = fix or f"choose another {option}"
    target = Path(os.path.abspath(Path(path).expanduser()))
    if _exists(target):
        if folder and not target.is_dir():
            raise OutputError(f"{option} {given!r} is a file; pass a folder (or a path that does not exist yet)")
        if not folder and target.is_dir():
            raise OutputError(f"{option} {given!r} is a folder; pass a file path")
    where = target if folder and target.is_dir() else target.parent
    while not _exists(where):
        where = where.parent
    if not where.is_dir():
        raise OutputError(f"{option} {given!r}: {where} is a file, not a folder; {fix}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".mu_fast-write-check-", dir=where)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise OutputError(f"{option} {given!r}: cannot write in {where} ({reason}); {fix} or make {where} "
                          "writable") from None
    if append and target.is_file():
        try:
            with open(target, "ab"):
                pass
        except OSError as err:
            raise OutputError(f"{option} {given!r} cannot be appended to ({err.strerror or type(err).__name__}); "
                              f"make it writable, or {fix}") from None
    return Path(path)


@contextmanager
def writing_output(option: str, path: str | os.PathLike, kept: str) -> Iterator[None]:
    """Around a command's final writes: a filesystem error (``WRITE_ERRNOS``: read-only, permission, disk full,
    ...) becomes ``OutputError``, one line naming ``option``, the path, the error and ``kept`` (what was kept, e.g.
    "the runs stored before are kept")."""
    try:
        yield
    except OutputError:
        raise
    except OSError as err:
        # A bare OSError with a message and no errno is mu_fast's own (e.g. the store's "short write ... disk full?").
        if err.errno not in WRITE_ERRNOS and not (type(err) is OSError and err.errno is None and err.args):
            raise
        where = f" ({err.filename})" if err.filename and str(err.filename) != str(path) else ""
        raise OutputError(f"{option} {str(path)!r}: writing failed: {err.strerror or err}{where}; {kept}") from err


def check_input_file(option: str, path: Path, what: str) -> Path:
    """An existing file for ``option``, else FileNotFoundError naming the option and what it expects."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{option} {str(path)!r} does not exist; pass {what}")
    if not path.is_file():
        raise IsADirectoryError(f"{option} {str(path)!r} is not a file; pass {what}")
    return path


def mask_files(path: Path) -> tuple[Path, Path]:
    """The two files ``Mask.save(path)`` writes: ``<base>.safetensors`` and ``<base>.json``."""
    base = Path(path)
    if base.suffix in (".safetensors", ".json"):
        base = base.with_suffix("")
    return base.with_suffix(".safetensors"), base.with_suffix(".json")


def check_mask_input(path: Path) -> Path:
    """The ``.safetensors`` file of a saved mask for ``--mask`` (FileNotFoundError naming the option if absent)."""
    st_path, _ = mask_files(Path(path).expanduser())
    if not st_path.is_file():
        raise FileNotFoundError(f"--mask {str(path)!r}: no mask at {st_path}; pass a mask saved by "
                                "`mu-fast localize ... --out PATH`")
    return st_path


# ------------------------------------------------------------------ models
@dataclass(frozen=True)
class ModelRef:
    """What MODEL names: ``kind`` "organism" (``value`` = preset), "local" (a checkpoint folder), "hub" or "random"
    (``value`` = ``random:<shipped name>``: random weights of a shipped config, for ``mu-fast plan``).
    ``organism``: for a folder saved by ``mu-fast edit --save-model`` from the organism, the organism's preset (its
    facts are the organism's)."""

    kind: str
    value: str
    organism: str | None = None


EDIT_RECORD = "mu_fast_edit.json"


def saved_organism_preset(folder: Path) -> str | None:
    """The organism preset a saved edited model folder was edited from (its ``mu_fast_edit.json``), else None."""
    import json

    record = folder / EDIT_RECORD
    if not record.is_file():
        return None
    try:
        load = json.loads(record.read_text()).get("load") or {}
    except (ValueError, AttributeError):
        raise ValueError(f"MODEL {str(folder)!r}: {EDIT_RECORD} is not valid JSON; save the model again with "
                         "`mu-fast edit --save-model`") from None
    name = str(load.get("model") or "")
    if load.get("source") != "organism" and not name.startswith("organism"):
        return None
    preset = name.split(":", 1)[1] if ":" in name else "demo"
    return preset if preset in ORGANISM_PRESETS else None


def _looks_like_path(name: str) -> bool:
    return (name.startswith(("/", "./", "../", "~", ".")) or name.endswith(("/", os.sep)) or name.count("/") > 1
            or os.sep in name and os.sep != "/")


def resolve_model(name: str, hub_timeout: float = HUB_CHECK_SECONDS) -> ModelRef:
    """Check MODEL before anything loads: the organism, an existing checkpoint folder, or a hub id.

    A hub id is checked against the hub with a ``hub_timeout``-second connection attempt; when the hub does not
    answer, the process goes offline (``HF_HUB_OFFLINE=1``) and the id must be in the local Hugging Face cache.
    """
    if name == "organism" or name.startswith("organism:"):
        preset = name.split(":", 1)[1] if ":" in name else "demo"
        check_choice("MODEL organism preset", preset, ORGANISM_PRESETS)
        return ModelRef("organism", preset)
    if name.startswith("random:"):
        from mu_fast.models.shipped import shipped_name

        try:
            return ModelRef("random", f"random:{shipped_name(name.split(':', 1)[1])}")
        except ValueError as err:
            raise ValueError(f"MODEL {name!r}: {err}") from None
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"MODEL {name!r} is a file; pass the checkpoint folder (the one with config.json)")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"MODEL {name!r} is a folder without config.json; pass a folder written by "
                                    "save_pretrained (or `mu-fast edit --save-model`)")
        return ModelRef("local", str(path), saved_organism_preset(path))
    if _looks_like_path(name) or not _HUB_ID.match(name):
        raise FileNotFoundError(f"MODEL {name!r} does not exist; pass an existing checkpoint folder, a hub id "
                                "such as google/gemma-2-9b, or organism")
    ensure_hub_or_offline(name, hub_timeout)
    return ModelRef("hub", name)


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT") or DEFAULT_HUB_ENDPOINT


def hub_reachable(endpoint: str | None = None, timeout: float = HUB_CHECK_SECONDS) -> bool:
    """Whether the hub accepts a TCP connection within ``timeout`` seconds (name lookup included)."""
    url = urlparse(endpoint or hub_endpoint())
    host = url.hostname or ""
    port = url.port or (80 if url.scheme == "http" else 443)
    answer: list[bool] = []

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                answer.append(True)
        except OSError:
            answer.append(False)

    # The name lookup inside create_connection ignores the timeout, so the attempt runs in a thread we stop
    # waiting for.
    worker = threading.Thread(target=attempt, daemon=True)
    start = time.monotonic()
    worker.start()
    worker.join(timeout)
    return bool(answer and answer[0]) and time.monotonic() - start <= timeout + 0.5


def go_offline() -> None:
    """Make huggingface_hub / transformers in this process use only the local cache (no retries)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import sys

    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:  # already imported: the environment variable was read at import time
        constants.HF_HUB_OFFLINE = True


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def ensure_hub_or_offline(repo_id: str, timeout: float = HUB_CHECK_SECONDS) -> None:
    """Go offline when the hub does not answer within ``timeout`` s; then ``repo_id`` must be in the local cache."""
    reason = "HF_HUB_OFFLINE is set"
    if not hub_offline():
        if hub_reachable(timeout=timeout):
            return
        go_offline()
        reason = f"the hub ({hub_endpoint()}) did not answer within {timeout:g} s"
    if not _in_local_cache(repo_id):
        raise FileNotFoundError(f"MODEL {repo_id!r} is not a local folder, {reason}, and it is not in the local "
                                "Hugging Face cache; pass a local checkpoint folder, or download it where the hub "
                                f"is reachable (hf download {repo_id})")


def _in_local_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    found = try_to_load_from_cache(repo_id, "config.json")
    return isinstance(found, str)


# ------------------------------------------------------------------- tasks
def check_task_options(dataset: str, model: ModelRef, forget_split: str, inject_label: str | None,
                       cf_model: str | None, datasets: Sequence[str]) -> None:
    """Dataset, split, edit target and CounterFact table, each named by its option (and MODEL: random weights have
    no tokenizer for the facts)."""
    if model.kind == "random":
        raise ValueError(f"MODEL {model.value!r} has random weights and no tokenizer, so its facts cannot be "
                         "localized, edited or evaluated here; use it with `mu-fast plan`, in a sweep spec with "
                         "tokenizer: (mu-fast sweep), or from Python (mu_fast.models.build_random_model)")
    check_choice("--dataset", dataset, datasets)
    if dataset == "organism" and model.kind != "organism" and not model.organism:
        raise ValueError("--dataset organism needs MODEL organism (or organism:ci, or a model saved from it by "
                         "`mu-fast edit --save-model`); for another model use --dataset sports or --dataset counterfact")
    if dataset == "counterfact":
        from mu_fast.data.counterfact import CF_FORGET_SPLITS as names
        from mu_fast.data.datadir import PAPER_MODELS

        if not cf_model:
            raise ValueError(f"--dataset counterfact needs --cf-model (one of {', '.join(PAPER_MODELS)}): it picks "
                             "the filtered CounterFact table")
        check_choice("--cf-model", cf_model, tuple(PAPER_MODELS))
    else:
        from mu_fast.data.sports import FORGET_SPLIT_NAMES as names
    name, _, suffix = forget_split.rpartition("_")
    if name not in names or suffix not in ("split", "unsplit"):
        options = ", ".join(f"{n}_split/_unsplit" for n in names)
        raise ValueError(f"--forget-split {forget_split!r} is not known for --dataset {dataset}; choose one of "
                         f"{options}")
    if dataset != "counterfact":
        from mu_fast.data.sports import INJECT_LABELS

        check_choice("--inject-label", "None" if inject_label is None else inject_label, INJECT_LABELS)
