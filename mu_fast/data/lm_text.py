"""Generic text for the LM retain loss (the paper streams the Pile; reference/authors_repo.md §1.3, §3.3).

``load_lm_texts(path, n, seed)`` reads a local Pile-style file: ``.jsonl`` (one JSON object per line with a
``"text"`` field, as the Pile's own shards, or one JSON string per line), ``.json`` (a list of strings or of such
objects) or any other text file (one text per non-empty line); ``.gz`` / ``.zst`` compressed files are read as
streams (``.zst`` needs the ``zstandard`` package). Only the first ``LOCAL_SHUFFLE_BUFFER`` texts (or ``n``, if
larger) are read and shuffled, like the authors' streaming shuffle buffer, so a multi-GB shard costs seconds.
``load_lm_texts("pile", n, seed)`` streams ``monology/pile-uncopyrighted`` through ``datasets`` (online only).
The caller truncates each text to its token budget (the paper: 100 tokens for editing, 128 for relearning).

``resolve_lm_texts`` decides what the LM term of an edit runs on and says so (``LMText.describe()`` goes into
results): an explicit source, else the task's own texts (the organism's filler), else an error naming the fix
(``missing="error"``, the default, so the term is never dropped silently) or the term off with the reason
(``missing="off"``).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PILE_HF_DATASET = "monology/pile-uncopyrighted"
PILE_SHUFFLE_BUFFER = 10_000
LOCAL_SHUFFLE_BUFFER = 50_000  # the authors' shuffle buffer for the training Pile stream
MISSING_RULES = ("error", "off")


def load_lm_texts(source: str | os.PathLike, n: int, seed: int = 0) -> list[str]:
    """``n`` non-empty texts from ``source`` (a local file, or ``"pile"``), sampled with ``seed``.

    A local file is read whole, its texts shuffled with ``random.Random(seed)`` and the first ``n``
    returned; a file with fewer than ``n`` texts raises ``ValueError``. The Pile is streamed and shuffled
    with a buffer of ``PILE_SHUFFLE_BUFFER`` documents.
    """
    if not isinstance(n, int) or n <= 0:
        raise ValueError(f"n must be a positive number of texts; got {n!r}")
    if str(source) == "pile":
        return _stream_pile(n, seed)
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"LM text source {str(source)!r} is neither 'pile' nor an existing file; pass a .txt/.jsonl/.json "
            "file of texts, or 'pile' to stream the Pile (needs `datasets` and a network)"
        )
    limit = max(n, LOCAL_SHUFFLE_BUFFER)
    texts = []
    for text in _read_texts(path):
        if text.strip():
            texts.append(text)
            if len(texts) == limit:
                break
    if len(texts) < n:
        raise ValueError(f"{path} holds {len(texts)} non-empty texts; n={n} asked for more")
    random.Random(seed).shuffle(texts)
    return texts[:n]


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    if path.suffix == ".zst":
        try:
            import zstandard
        except ImportError as err:
            raise ValueError(f"{path} is zstandard-compressed: pip install zstandard, or decompress it first") from err
        return io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")), encoding="utf-8")
    return open(path, encoding="utf-8")


def _read_texts(path: Path) -> Iterator[str]:
    kind = Path(path.stem).suffix if path.suffix in (".gz", ".zst") else path.suffix
    with _open_text(path) as handle:
        if kind == ".jsonl":
            for k, line in enumerate(handle):
                if line.strip():
                    yield _text_of(json.loads(line), path, k)
        elif kind == ".json":
            items = json.load(handle)
            if not isinstance(items, list):
                raise ValueError(f"{path} must hold a JSON list of texts (or of objects with a 'text' field)")
            yield from (_text_of(item, path, k) for k, item in enumerate(items))
        else:
            yield from (line.rstrip("\r\n") for line in handle)


def _text_of(item: Any, path: Path, k: int) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict) and isinstance(item.get("text"), str):
        return item["text"]
    raise ValueError(f"{path}, item {k}: expected a string or an object with a string 'text' field; got {str(item)[:80]!r}")


def _stream_pile(n: int, seed: int) -> list[str]:
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            "source='pile' streams monology/pile-uncopyrighted and needs the Hugging Face `datasets` library "
            "(pip install datasets) and a network; offline, pass a local .txt/.jsonl file of texts instead"
        ) from err
    try:
        stream = datasets.load_dataset(PILE_HF_DATASET, split="train", streaming=True)
        stream = stream.shuffle(seed=seed, buffer_size=PILE_SHUFFLE_BUFFER)
        texts = []
        for item in stream:
            if item.get("text", "").strip():
                texts.append(item["text"])
            if len(texts) == n:
                break
    except Exception as err:  # offline or hub errors: one clear message with the fix
        raise ConnectionError(
            f"could not stream {PILE_HF_DATASET!r} from the Hugging Face hub ({type(err).__name__}: {err}); "
            "offline, pass a local .txt/.jsonl file of texts instead"
        ) from err
    return texts


@dataclass(frozen=True)
class LMText:
    """What the LM retain term runs on. texts: the texts (empty when off); source: ``file:<path>``,
    ``pile:<dataset>``, ``task`` (the task's own texts) or ``none``; used: whether the term runs; reason: why not."""

    texts: list[str] = field(repr=False)
    source: str
    used: bool
    reason: str = ""
    seed: int | None = None

    def describe(self) -> dict[str, Any]:
        """A JSON-ready record for results: used, source, n_texts, seed, sha256 of the texts, reason."""
        digest = hashlib.sha256("\x00".join(self.texts).encode()).hexdigest()[:16] if self.texts else None
        return {"used": self.used, "source": self.source, "n_texts": len(self.texts), "seed": self.seed,
                "sha256": digest, "reason": self.reason}


def resolve_lm_texts(
    lm_coef: float,
    source: str | os.PathLike | None = None,
    task_texts: Sequence[str] = (),
    n: int = 2048,
    seed: int = 0,
    missing: str = "error",
) -> LMText:
    """The LM retain texts of an edit, and where they came from.

    lm_coef 0: the term is off (reason "lm_coef = 0"). Else ``source`` (a local file or ``"pile"``, read by
    ``load_lm_texts(source, n, seed)``), else ``task_texts`` (e.g. the organism's filler), else ``missing``:
    "error" raises ValueError naming the fix; "off" returns the term off with the reason.
    """
    if missing not in MISSING_RULES:
        raise ValueError(f"missing must be one of {MISSING_RULES}; got {missing!r}")
    if not lm_coef:
        return LMText([], "none", False, "lm_coef = 0")
    if source is not None:
        texts = load_lm_texts(source, n, seed)
        where = f"pile:{PILE_HF_DATASET}" if str(source) == "pile" else f"file:{Path(source).expanduser().resolve()}"
        return LMText(texts, where, True, seed=seed)
    if task_texts:
        return LMText(list(task_texts), "task", True)
    why = (f"lm_coef = {lm_coef} but no LM text was given (the paper streams the Pile): pass a local Pile-style file "
           "(.jsonl with a 'text' field, or plain text, one text per line), or 'pile' to stream it online, or set "
           "lm_coef=0 to drop the term")
    if missing == "error":
        raise ValueError(why)
    return LMText([], "none", False, why)
