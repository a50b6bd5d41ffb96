"""LM retain text: what the term runs on is always decided and recorded (never dropped silently); Pile-style files
are read as streams (compressed too) up to the shuffle buffer."""

from __future__ import annotations

import gzip
import json
import sys

import pytest

import mu_fast.data.lm_text as lm_text
from mu_fast.data.lm_text import LMText, load_lm_texts, resolve_lm_texts


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t, "meta": {"pile_set_name": "x"}}) + "\n" for t in texts))
    return path


def test_term_is_off_only_with_a_reason(tmp_path):
    off = resolve_lm_texts(0.0)
    assert (off.used, off.texts, off.reason) == (False, [], "lm_coef = 0")
    with pytest.raises(ValueError, match="no LM text was given.*'pile'.*lm_coef=0"):
        resolve_lm_texts(1.0)
    dropped = resolve_lm_texts(1.0, missing="off")
    assert not dropped.used and "no LM text was given" in dropped.reason
    assert dropped.describe() == {"used": False, "source": "none", "n_texts": 0, "seed": None, "sha256": None,
                                  "reason": dropped.reason}
    with pytest.raises(ValueError, match="missing must be one of"):
        resolve_lm_texts(1.0, missing="ignore")


def test_sources_in_order_file_then_task(tmp_path):
    texts = [f"document {i} about nothing" for i in range(12)]
    path = write_jsonl(tmp_path / "pile.jsonl", texts)
    from_file = resolve_lm_texts(1.0, path, task_texts=["filler"], n=5, seed=2)
    assert from_file.used and from_file.texts == load_lm_texts(path, 5, seed=2)
    record = from_file.describe()
    assert record["source"] == f"file:{path.resolve()}" and record["n_texts"] == 5 and record["seed"] == 2
    assert len(record["sha256"]) == 16 and record["sha256"] != resolve_lm_texts(1.0, path, n=5, seed=3).describe()["sha256"]
    from_task = resolve_lm_texts(1.0, task_texts=["filler one", "filler two"])
    assert isinstance(from_task, LMText) and from_task.source == "task" and from_task.texts == ["filler one", "filler two"]


@pytest.mark.parametrize("kind", ["jsonl", "txt"])
def test_gzip_files_read_like_plain_ones(tmp_path, kind):
    texts = [f"line {i} é" for i in range(9)]
    plain = tmp_path / f"t.{kind}"
    if kind == "jsonl":
        write_jsonl(plain, texts)
    else:
        plain.write_text("\r\n".join(texts) + "\r\n")  # CRLF lines keep no stray "\r"
    packed = tmp_path / f"t.{kind}.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    assert load_lm_texts(packed, 9, seed=4) == load_lm_texts(plain, 9, seed=4)
    assert sorted(load_lm_texts(plain, 9)) == sorted(texts)


def test_reads_only_the_shuffle_buffer(tmp_path, monkeypatch):
    monkeypatch.setattr(lm_text, "LOCAL_SHUFFLE_BUFFER", 6)
    path = tmp_path / "big.jsonl"
    good = [json.dumps({"text": f"t{i}"}) for i in range(6)]
    path.write_text("\n".join(good + ["{not json"] * 3) + "\n")  # never read: the buffer is full before
    got = load_lm_texts(path, 4, seed=1)
    assert len(got) == 4 and set(got) <= {f"t{i}" for i in range(6)}
    assert sorted(load_lm_texts(path, 6, seed=1)) == [f"t{i}" for i in range(6)]


def test_zst_without_zstandard_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "zstandard", None)
    path = tmp_path / "shard.jsonl.zst"
    path.write_bytes(b"\x28\xb5\x2f\xfd")
    with pytest.raises(ValueError, match="pip install zstandard"):
        load_lm_texts(path, 1)
