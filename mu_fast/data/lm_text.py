"""Generic text for the LM retain loss (the paper streams the Pile; reference/authors_repo.md §1.3, §3.3).

``load_lm_texts(path, n, seed)`` reads a local file: ``.jsonl`` (one JSON object per line with a ``"text"``
field, or one JSON string per line), ``.json`` (a list of strings or of such objects) or any other text file
(one text per non-empty line). ``load_lm_texts("pile", n, seed)`` streams ``monology/pile-uncopyrighted``
through the ``datasets`` library (online only). The caller truncates each text to its token budget (the
paper: 100 tokens).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

PILE_HF_DATASET = "monology/pile-uncopyrighted"
PILE_SHUFFLE_BUFFER = 10_000


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
    texts = [t for t in _read_texts(path) if t.strip()]
    if len(texts) < n:
        raise ValueError(f"{path} holds {len(texts)} non-empty texts; n={n} asked for more")
    random.Random(seed).shuffle(texts)
    return texts[:n]


def _read_texts(path: Path) -> list[str]:
    raw = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [_text_of(json.loads(line), path, k) for k, line in enumerate(raw.splitlines()) if line.strip()]
    if path.suffix == ".json":
        items = json.loads(raw)
        if not isinstance(items, list):
            raise ValueError(f"{path} must hold a JSON list of texts (or of objects with a 'text' field)")
        return [_text_of(item, path, k) for k, item in enumerate(items)]
    return raw.splitlines()


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
