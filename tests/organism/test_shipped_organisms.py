"""The shipped organisms: the demo's and the test suite's weights are committed with checksums, loaded and verified
instead of trained, so every machine runs the same organism. The pins below change only on purpose (retrained and
re-shipped with ``python -m mu_fast.organism.shipped``)."""

from __future__ import annotations

import json
import shutil

import pytest

import mu_fast.organism.organism as organism_module
import mu_fast.organism.shipped as shipped_module
from mu_fast.organism import OrganismConfig, load_organism, organism_facts
from mu_fast.organism.organism import facts_digest
from mu_fast.organism.shipped import MANIFEST, SHIPPED_DIR, checksums, file_sha256, shipped_path

# sha256 of the shipped weights and the digest of the facts they were trained on.
PINS = {
    "demo": {"model.safetensors": "3960337e3ebce3b13a5b34a2ac8d186e334812be846810ac8d89ea63306293d3", "facts_digest": "37e8926726b1b499"},
    "ci": {"model.safetensors": "5e50e80e5935a3daf1a335f90ae592e9e69a5ddac6de5f2a30e9eb03524ccee5", "facts_digest": "6cea7b7dce555c9a"},
}


@pytest.mark.parametrize("name", sorted(PINS))
def test_shipped_weights_checksums_and_facts_are_pinned(name):
    folder = SHIPPED_DIR / name
    manifest = json.loads((folder / MANIFEST).read_text())
    assert file_sha256(folder / "model.safetensors") == PINS[name]["model.safetensors"]
    assert manifest["sha256"] == checksums(folder)  # every file matches its recorded checksum
    assert manifest["sha256"]["model.safetensors"] == PINS[name]["model.safetensors"]
    config = getattr(OrganismConfig, name)()
    assert manifest["config_hash"] == config.config_hash() and OrganismConfig.from_dict(manifest["config"]) == config
    # The facts this mu_fast generates are the ones the weights were trained on.
    assert manifest["facts_digest"] == facts_digest(organism_facts(config)) == PINS[name]["facts_digest"]
    assert manifest["facts"]["seed"] == config.seed and manifest["facts"]["n_athletes"] == config.n_athletes
    kernels = manifest["trained_with"]["kernels"]
    assert kernels["portable"] and kernels["torch_threads"] == 1  # how it was made is on record


@pytest.mark.parametrize("name", sorted(PINS))
def test_shipped_organisms_load_without_training(name, monkeypatch, tmp_path):
    def no_training(*args, **kwargs):
        raise AssertionError("a shipped organism must not be trained")

    monkeypatch.setattr(organism_module, "_build", no_training)
    org = load_organism(getattr(OrganismConfig, name)(), cache_dir=tmp_path, progress=False)
    assert org.source == "shipped" and org.path == SHIPPED_DIR / name
    assert list(tmp_path.iterdir()) == []  # nothing written to the cache
    assert org.report["accuracy"]["normal"] > 0.9  # the report measured when it was trained


def test_a_damaged_shipped_file_is_refused_with_the_fix(monkeypatch, tmp_path):
    copy = tmp_path / "ci"
    shutil.copytree(SHIPPED_DIR / "ci", copy)
    weights = bytearray((copy / "model.safetensors").read_bytes())
    weights[-1] ^= 0xFF
    (copy / "model.safetensors").write_bytes(bytes(weights))
    monkeypatch.setattr(shipped_module, "SHIPPED_DIR", tmp_path)
    assert shipped_path(OrganismConfig.ci()) == copy
    with pytest.raises(ValueError, match=r"\['model.safetensors'\].*git checkout"):
        load_organism(OrganismConfig.ci(), progress=False)


def test_changed_fact_generation_is_refused(monkeypatch):
    monkeypatch.setattr(shipped_module, "facts_digest", lambda facts: "0" * 16)
    with pytest.raises(ValueError, match="facts this mu_fast generates"):
        load_organism(OrganismConfig.ci(), progress=False)


def test_retraining_is_on_request_and_says_so(monkeypatch, tmp_path, capsys):
    built = []
    monkeypatch.setattr(organism_module, "_build", lambda config, path, progress, replace=False: built.append(replace))
    monkeypatch.setattr(organism_module, "_load", lambda config, path, source="cache": (path, source))
    path, source = load_organism(OrganismConfig.ci(), cache_dir=tmp_path, retrain=True)
    assert built == [True] and source == "trained" and path.parent == tmp_path
    assert "retraining on request" in capsys.readouterr().err


def test_settings_without_shipped_weights_train_and_say_so(tmp_path, capsys):
    config = OrganismConfig.ci(n_athletes=30, steps=2, d_model=16, d_mlp=32, batch_size=8)
    assert shipped_path(config) is None
    org = load_organism(config, cache_dir=tmp_path, progress=True)
    assert org.source == "trained" and "no shipped weights" in capsys.readouterr().err
    assert load_organism(config, cache_dir=tmp_path, progress=True).source == "cache"
    assert "training" not in capsys.readouterr().err
