"""The multilayer_lookup preset: the model it builds, and that it is the organism study's passing candidate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mu_fast.organism import OrganismConfig
from mu_fast.organism.train import make_model

STUDY = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "CPU" / "organism_study.json"


def test_multilayer_lookup_is_the_measured_candidate_that_meets_issue_13s_criteria():
    # The preset must be a configuration the study measured, not a guess: its checkpoint hash names a candidate
    # whose probe rose over >= 2 MLP layers and which knew its facts in every format.
    entries = {e["config_hash"]: e for e in json.loads(STUDY.read_text())["candidates"]}
    entry = entries.get(OrganismConfig.multilayer_lookup().config_hash())
    assert entry is not None, "multilayer_lookup() changed: rerun benchmarks/organism_study.py for it"
    assert entry["meets_all"]
    flu = entry["flu"]
    n = flu["n_test"]
    gains = [round(flu["acc_post"][l] * n) - round(flu["acc_mid"][l] * n) for l in flu["layers"]]
    assert sum(g >= 0.05 * n for g in gains) >= 2
    assert entry["min_accuracy"] >= 0.95


@pytest.mark.parametrize("overrides", [{}, {"seed": 3}, {"n_layers": 6}])
def test_multilayer_lookup_builds_one_narrow_head_and_narrow_mlps(overrides, rng):
    config = OrganismConfig.multilayer_lookup(**overrides)
    assert config.conjunctive and config.steps == 800
    model = make_model(config, vocab_size=40).double()
    layers = model.model.layers
    assert len(layers) == overrides.get("n_layers", 4)
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        assert [tuple(p.weight.shape) for p in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)] == [
            (8, 64), (8, 64), (8, 64), (64, 8)]
        assert tuple(mlp.gate_proj.weight.shape) == (32, 64) and tuple(mlp.down_proj.weight.shape) == (64, 32)
    ids = torch.randint(0, 40, (2, 7), generator=rng)
    logits = model(input_ids=ids).logits
    assert logits.shape == (2, 7, 40) and torch.isfinite(logits).all()


def test_multilayer_lookup_rejects_a_head_split_that_does_not_fit():
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        OrganismConfig.multilayer_lookup(n_kv_heads=2)
