"""Data directory resolution, missing-file errors, the optional hub path and LM text sources."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from mu_fast.data import datadir
from mu_fast.data.counterfact import load_counterfact_table, load_counterfact_task
from mu_fast.data.datadir import COUNTERFACT_HF_DATASET, data_file, paper_model, read_table, resolve_data_dir
from mu_fast.data.lm_text import load_lm_texts
from mu_fast.data.sports import load_sports_task


# ------------------------------------------------------------------ resolution
def test_resolution_order(tmp_path, monkeypatch, data_dir):
    explicit, env = tmp_path / "explicit", tmp_path / "env"
    explicit.mkdir()
    env.mkdir()
    monkeypatch.setenv("MU_FAST_DATA_DIR", str(env))
    assert resolve_data_dir(explicit) == explicit
    assert resolve_data_dir() == env
    monkeypatch.delenv("MU_FAST_DATA_DIR")
    monkeypatch.setattr(datadir, "_default_candidates", lambda: [tmp_path / "nope", data_dir])
    assert resolve_data_dir() == data_dir


def test_default_candidates_are_next_to_cwd_and_repo(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    repo = Path(datadir.__file__).resolve().parents[2]
    candidates = datadir._default_candidates()
    assert candidates[0] == (tmp_path.parent / "shared" / "data").resolve()
    assert candidates[-1] == (repo.parent / "shared" / "data").resolve()


def test_bad_directories_raise(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="data_dir="):
        resolve_data_dir(tmp_path / "missing")
    monkeypatch.setenv("MU_FAST_DATA_DIR", str(tmp_path / "gone"))
    with pytest.raises(FileNotFoundError, match=r"\$MU_FAST_DATA_DIR"):
        resolve_data_dir()
    monkeypatch.delenv("MU_FAST_DATA_DIR")
    monkeypatch.setattr(datadir, "_default_candidates", lambda: [tmp_path / "a", tmp_path / "b"])
    with pytest.raises(FileNotFoundError, match="set \\$MU_FAST_DATA_DIR"):
        data_file("sports.csv")


# ------------------------------------------------------------- missing files
@pytest.mark.parametrize(
    "name, source",
    [
        ("sports.csv", "magikarp01/tasks"),
        ("counterfact_mc_questions.parquet", "magikarp01/tasks"),
        ("counterfact_google_gemma-7b.csv", "split 'gemma_7b'"),
        ("counterfact_google_gemma-2-9b.csv", "split 'gemma2_9b'"),
        ("localization_graphs/google_gemma-7b_sports_all_ap_graph.json", "models/google_gemma-7b_sports_all_ap_graph.pkl"),
        ("counterfact_manual_results/google_gemma-7b_manual_layers_0_16.json", "experiments/counterfact_manual/results"),
    ],
)
def test_missing_file_names_file_place_and_source(tmp_path, name, source):
    with pytest.raises(FileNotFoundError) as info:
        data_file(name, tmp_path)
    message = str(info.value)
    assert name in message and str(tmp_path / name) in message and source in message


def test_missing_llama_table_explains_regeneration(data_dir):
    with pytest.raises(FileNotFoundError) as info:
        load_counterfact_task("llama-3-8b", data_dir=data_dir)
    message = str(info.value)
    for needle in ("counterfact_meta-llama_Meta-Llama-3-8B.csv", "not in shared/data", "prob_of_correct_answer", ">= 0.5",
                   "'llama3_8b'", COUNTERFACT_HF_DATASET, "table="):
        assert needle in message


def test_loaders_raise_for_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="sports.csv"):
        load_sports_task(data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="counterfact_google_gemma-2-9b.csv"):
        load_counterfact_task("gemma-2-9b", data_dir=tmp_path)


def test_read_table_returns_independent_copies(data_dir):
    a = read_table("sports.csv", data_dir)
    a.loc[0, "athlete"] = "changed"
    assert read_table("sports.csv", data_dir).loc[0, "athlete"] != "changed"


@pytest.mark.parametrize(
    "name, key",
    [("gemma-7b", "gemma-7b"), ("google/gemma-7b", "gemma-7b"), ("gemma_7b", "gemma-7b"), ("gemma2_9b", "gemma-2-9b"),
     ("google_gemma-2-9b", "gemma-2-9b"), ("gemma2-9b", "gemma-2-9b"), ("meta-llama/Meta-Llama-3-8B", "llama-3-8b"),
     ("llama3-8b", "llama-3-8b"), ("llama-3", "llama-3-8b")],
)
def test_paper_model_aliases(name, key):
    assert paper_model(name).key == key


def test_unknown_model_raises():
    with pytest.raises(ValueError, match="unknown paper model 'gpt2'"):
        paper_model("gpt2")


# ------------------------------------------------------------------ hub path
def _fake_datasets(monkeypatch, load_dataset):
    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", module)


def test_hub_without_datasets_library(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(ImportError, match="pip install datasets"):
        load_counterfact_table("gemma-7b", hf_dataset=COUNTERFACT_HF_DATASET)
    with pytest.raises(ImportError, match="datasets"):
        load_lm_texts("pile", 3)


def test_hub_offline_is_a_clear_error(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("no network")

    _fake_datasets(monkeypatch, offline)
    with pytest.raises(ConnectionError, match="could not load .*gemma2_9b.*no network"):
        load_counterfact_table("gemma-2-9b", hf_dataset=COUNTERFACT_HF_DATASET)
    with pytest.raises(ConnectionError, match="pile-uncopyrighted"):
        load_lm_texts("pile", 3)


def test_hub_table_feeds_the_same_task(monkeypatch, data_dir):
    local = read_table("counterfact_google_gemma-7b.csv", data_dir)
    calls = []

    class Table:
        def to_pandas(self):
            return local.copy()

    def load_dataset(name, split):
        calls.append((name, split))
        return Table()

    _fake_datasets(monkeypatch, load_dataset)
    online = load_counterfact_task("gemma-7b", data_dir=data_dir, hf_dataset=COUNTERFACT_HF_DATASET)
    offline = load_counterfact_task("gemma-7b", data_dir=data_dir)
    assert calls == [(COUNTERFACT_HF_DATASET, "gemma_7b")]
    assert list(online.forget_train.prompts) == list(offline.forget_train.prompts)
    assert list(online.maintain_test.answers) == list(offline.maintain_test.answers)


# ------------------------------------------------------------------ LM texts
def _write_sources(tmp_path, texts):
    (tmp_path / "t.txt").write_text("\n".join(texts[:3] + [""] + texts[3:]) + "\n")
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps({"text": t, "meta": 1}) for t in texts) + "\n\n")
    (tmp_path / "t.json").write_text(json.dumps(texts))
    return [tmp_path / "t.txt", tmp_path / "t.jsonl", tmp_path / "t.json"]


@pytest.mark.parametrize("suffix", [0, 1, 2])
def test_local_lm_texts(tmp_path, suffix):
    texts = [f"text number {i} with \"quotes\" and unicode é" for i in range(10)]
    path = _write_sources(tmp_path, texts)[suffix]
    got = load_lm_texts(path, 4, seed=3)
    assert len(got) == 4 and len(set(got)) == 4 and set(got) <= set(texts)
    assert got == load_lm_texts(str(path), 4, seed=3)
    assert sorted(load_lm_texts(path, 10, seed=0)) == sorted(texts)
    assert load_lm_texts(path, 10, seed=0) != load_lm_texts(path, 10, seed=1)
    with pytest.raises(ValueError, match="holds 10 non-empty texts"):
        load_lm_texts(path, 11)


def test_lm_text_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither 'pile' nor an existing file"):
        load_lm_texts(tmp_path / "none.txt", 2)
    with pytest.raises(ValueError, match="positive"):
        load_lm_texts("pile", 0)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match="item 0"):
        load_lm_texts(bad, 1)


def test_pile_stream_uses_seed_and_skips_empty(monkeypatch):
    seen = {}

    class Stream:
        def shuffle(self, seed, buffer_size):
            seen.update(seed=seed, buffer=buffer_size)
            return self

        def __iter__(self):
            yield from ({"text": t} for t in ["a", "", "b", "  ", "c", "d"])

    def load_dataset(name, split, streaming):
        seen.update(name=name, split=split, streaming=streaming)
        return Stream()

    _fake_datasets(monkeypatch, load_dataset)
    assert load_lm_texts("pile", 3, seed=7) == ["a", "b", "c"]
    assert seen["name"] == "monology/pile-uncopyrighted" and seen["streaming"] and seen["seed"] == 7
