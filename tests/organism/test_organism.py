"""The CI organism really knows its facts and looks the sport up at the subject; trained organisms cache correctly.

The CI organism (``OrganismConfig.ci()``: 150 athletes, 4 layers of width 64) is shipped as weights
(tests/organism/test_shipped.py); the cache tests train a tiny organism of other settings into a temporary folder.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

import mu_fast.organism.organism as organism_module
from mu_fast.data.base import pad_batch
from mu_fast.models.forward import gathered_logits, lm_loss
from mu_fast.organism import (
    FORMATS,
    OrganismConfig,
    build_tokenizer,
    checkpoint_dir,
    load_organism,
    make_facts,
    organism_accuracy,
    organism_task,
)
from mu_fast.organism.train import make_model, train_model

# Formats the CI organism must answer with argmax accuracy >= 0.95 (the bar for the organism).
REQUIRED = ("normal", "qa", "mcq", "paraphrase")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread, as the organism trains: on a loaded 2-core machine two threads ran several times
    slower (see OrganismConfig.threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_organism_knows_its_facts(ci_organism) -> None:
    acc = organism_accuracy(ci_organism.model, ci_organism.tokenizer, ci_organism.facts, (*FORMATS, "activity"))
    assert acc == pytest.approx(ci_organism.report["accuracy"])  # the stored report is the model's
    low = {fmt: acc[fmt] for fmt in REQUIRED if acc[fmt] < 0.95}
    assert not low, f"argmax accuracy below 0.95: {low}; all: {acc}"
    # The second attribute and the subject-position lookup are learned too (measured 1.00 / 1.00).
    assert acc["city"] >= 0.8 and acc["city_qa"] >= 0.8, acc
    assert acc["activity"] >= 0.9, acc


def test_sport_is_decodable_at_the_subject(ci_organism) -> None:
    trained = ci_organism.report["subject_probe"]
    random_init = ci_organism.report["random_init_probe"]
    n_layers = ci_organism.config.n_layers
    assert len(trained) == len(random_init) == n_layers + 1
    # 45 held-out athletes: chance is 1/3 (sd ~0.07); measured trained >= 0.98 from layer 1, random <= 0.38.
    assert min(trained[1:]) >= 0.8, trained
    assert max(random_init) <= 0.6, random_init
    assert trained[0] <= 0.6, trained  # the token embeddings alone do not give the sport away


def test_organism_learned_the_filler_language(ci_organism) -> None:
    tok = ci_organism.tokenizer
    texts = list(ci_organism.facts.filler[:64])
    batch = pad_batch(tok(texts)["input_ids"], tok.pad_token_id)
    untrained = make_model(ci_organism.config, len(tok)).eval()
    assert lm_loss(ci_organism.model, batch) < 0.5 * lm_loss(untrained, batch)


TINY = OrganismConfig.ci(n_athletes=30, steps=3, d_model=16, d_mlp=32, batch_size=16)


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    """A tiny organism (no shipped weights) trained once into a module-wide cache."""
    cache = tmp_path_factory.mktemp("organism_cache")
    return cache, load_organism(TINY, cache_dir=cache, progress=False)


def test_cache_hit_reloads_identical_weights_without_training(tiny_cache, monkeypatch) -> None:
    cache, trained = tiny_cache

    def no_training(*args, **kwargs):
        raise AssertionError("a cache hit must not train")

    monkeypatch.setattr(organism_module, "_build", no_training)
    again = load_organism(TINY, cache_dir=cache, progress=False)
    assert again.path == trained.path == checkpoint_dir(TINY, cache) and again.source == "cache"
    first, second = dict(trained.model.named_parameters()), dict(again.model.named_parameters())
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert again.report == trained.report and again.facts == trained.facts
    prompts = again.tokenizer([p for p in organism_task(again).forget_test.prompts])["input_ids"]
    batch = pad_batch(prompts, again.tokenizer.pad_token_id)
    assert torch.equal(gathered_logits(again.model, batch), gathered_logits(trained.model, batch))


def test_cached_organism_files_are_as_readable_as_any_new_file(tiny_cache) -> None:
    from mu_fast.files import current_umask

    _, trained = tiny_cache
    for item in [trained.path, *trained.path.rglob("*")]:  # mkdtemp / safetensors make 0700 / 0600
        assert item.stat().st_mode & 0o777 == (0o777 if item.is_dir() else 0o666) & ~current_umask(), item


@pytest.mark.parametrize("change", [dict(seed=1), dict(steps=201), dict(n_cities=3), dict(arch="gemma2")])
def test_a_settings_change_misses_the_cache(tmp_path, monkeypatch, change) -> None:
    built = []
    monkeypatch.setattr(organism_module, "_build", lambda config, path, progress, replace=False: built.append(path))
    config = OrganismConfig.ci(**change)
    assert config.config_hash() != OrganismConfig.ci().config_hash()
    with pytest.raises(ValueError, match="lacks"):  # the stubbed build wrote nothing
        load_organism(config, cache_dir=tmp_path, progress=False)
    assert built == [checkpoint_dir(config, tmp_path)]
    # The number of threads is not part of the identity.
    assert OrganismConfig.ci(threads=1).config_hash() == OrganismConfig.ci().config_hash()


def test_corrupted_checkpoint_is_rejected(tiny_cache, tmp_path) -> None:
    _, trained = tiny_cache
    path = tmp_path / trained.path.name
    shutil.copytree(trained.path, path)
    settings = json.loads((path / "organism.json").read_text())
    settings["config"]["steps"] += 1
    (path / "organism.json").write_text(json.dumps(settings))
    with pytest.raises(ValueError, match="hashing to"):
        load_organism(TINY, cache_dir=tmp_path, progress=False)


def test_a_crash_while_saving_leaves_no_checkpoint(tmp_path, monkeypatch) -> None:
    config = OrganismConfig.ci(n_athletes=30, steps=2, d_model=16, d_mlp=32, batch_size=8)

    def crash(self, *args, **kwargs):
        raise RuntimeError("disk full")

    import transformers

    monkeypatch.setattr(transformers.PreTrainedTokenizerFast, "save_pretrained", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        load_organism(config, cache_dir=tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("arch", ["gemma2", "gemma"])
def test_other_architectures_train_save_and_load(arch: str, tmp_path) -> None:
    config = OrganismConfig.ci(arch=arch, n_athletes=30, steps=3, d_model=32, d_mlp=64, batch_size=16)
    organism = load_organism(config, cache_dir=tmp_path, progress=False)
    assert type(organism.model).__name__.lower().startswith(arch)
    assert organism.report["train"]["losses"] and all(math.isfinite(v) for v in organism.report["train"]["losses"])
    assert all(0.0 <= a <= 1.0 for a in organism.report["accuracy"].values())
    if arch == "gemma2":
        assert organism.model.config.final_logit_softcapping  # soft-capping kept on
    # The reloaded checkpoint computes what the trained model computed.
    fresh_facts = make_facts(config.n_athletes, config.n_cities, config.seed)
    tok = build_tokenizer(fresh_facts)
    retrained, _ = train_model(config, fresh_facts, tok, progress=False)
    ids = tok([p for p in organism_task(organism).forget_train.prompts])["input_ids"]
    batch = pad_batch(ids, tok.pad_token_id)
    torch.testing.assert_close(gathered_logits(organism.model, batch), gathered_logits(retrained, batch))


def test_training_is_deterministic() -> None:
    config = OrganismConfig.ci(n_athletes=30, steps=4, d_model=16, d_mlp=32, batch_size=16)
    facts = make_facts(config.n_athletes, config.n_cities, config.seed)
    tok = build_tokenizer(facts)
    a, log_a = train_model(config, facts, tok, progress=False)
    b, log_b = train_model(config, facts, tok, progress=False)
    assert log_a["losses"] == log_b["losses"]
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    c, _ = train_model(OrganismConfig.ci(n_athletes=30, steps=4, d_model=16, d_mlp=32, batch_size=16, seed=1), facts, tok, progress=False)
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters(), strict=True))


def test_bad_config_raises() -> None:
    with pytest.raises(ValueError, match="arch"):
        OrganismConfig(arch="gpt2")
    with pytest.raises(ValueError, match="mix"):
        OrganismConfig(mix={"normal": 1.0, "poetry": 1.0})
    with pytest.raises(ValueError, match="n_athletes"):
        OrganismConfig(n_athletes=5)
    with pytest.raises(TypeError, match="OrganismConfig"):
        load_organism("demo")  # type: ignore[arg-type]
