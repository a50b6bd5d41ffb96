"""ModelSession.execute_batch trains a batch's relearning attacks together (``relearn_attack_variants``) when asked
(by default on CUDA only): the records equal those of the same batch relearned run by run (every loss and
evaluation leaf, fp64: 1e-9), the batch's relearning time is split evenly over its runs, and a failing batched pass
falls back to per-run relearning. The end-to-end check against runs alone is tests/sweep/test_batches.py."""

from __future__ import annotations

import pytest

from mu_fast import sweep
from mu_fast.sweep.session import ModelSession

TOL = 1e-9


def _runs():
    return sweep.expand({
        "name": "r", "models": [{"name": "organism:ci", "dtype": "fp64"}],
        "tasks": [{"dataset": "organism", "forget_splits": ["first_16_unsplit"]}], "methods": ["flu", "random"],
        "edit": {"preset": "organism", "steps": 2, "lr": [1e-2, 3e-2]}, "seeds": [0, 1],
        "evaluations": {"formats": ["normal"], "batch_size": 16, "probes": False,
                        "relearn": {"steps": 2, "lr": 1e-3, "lora_rank": 4, "batch_size": 8, "lm_batch_size": 4}}})


def _same_relearn(a, b):
    assert set(a) == set(b)
    for key, value in b.items():
        if key not in ("losses", "evals", "final"):
            assert a[key] == value, key
    for x, y in zip(a["losses"], b["losses"], strict=True):
        for key, value in y.items():
            assert x[key] == pytest.approx(value, abs=TOL), key
    assert list(a["evals"]) == list(b["evals"])
    for step, sets in b["evals"].items():
        for what, metrics in sets.items():
            for key, value in metrics.items():
                other = a["evals"][step][what][key]
                exact = value is None or key == "n" or "argmax" in key
                assert other == value if exact else other == pytest.approx(value, abs=TOL), (step, what, key)


def test_batched_relearning_equals_per_run_relearning(organism_cache):
    runs = _runs()[:4]  # seeds 0 and 1, two runs each: configurations that share a seed
    session = ModelSession(runs[0].model, "cpu")
    batched = list(session.execute_batch(runs, batched_relearn=True))  # on a CPU only when asked
    per_run = list(session.execute_batch(runs, batched_relearn=False))
    assert [r["status"] for r in batched + per_run] == ["ok"] * 8, [r.get("error") for r in batched + per_run]
    seconds = batched[0]["batch"]["relearn_seconds"]
    assert seconds > 0 and all(r["batch"]["relearn_seconds"] == seconds for r in batched)
    for a, b in zip(batched, per_run, strict=True):
        assert a["run_id"] == b["run_id"] and b["batch"]["relearn_seconds"] is None
        assert a["timings"]["relearn"] == pytest.approx(seconds / len(runs))
        assert set(a["timings"]) == set(b["timings"])
        _same_relearn(a["results"]["relearn"], b["results"]["relearn"])
        for key, value in b["metrics"].items():
            if key != "seconds":
                assert a["metrics"][key] == pytest.approx(value, abs=TOL), key


def test_a_failing_batched_relearning_falls_back_to_per_run(organism_cache, monkeypatch):
    import mu_fast.evaluate

    def fail(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(mu_fast.evaluate, "relearn_attack_variants", fail)
    runs = _runs()[:2]
    records = list(ModelSession(runs[0].model, "cpu").execute_batch(runs, batched_relearn=True))
    assert [r["status"] for r in records] == ["ok", "ok"], [r.get("error") for r in records]
    assert all(r["batch"]["relearn_seconds"] is None and r["timings"]["relearn"] > 0
               and r["results"]["relearn"]["losses"] for r in records)


def test_on_a_gpu_k_adapters_must_fit_half_the_free_memory(monkeypatch):
    """Llama-3-8B at the paper's rank 512: one adapter is 1.34B elements (21.5 GB with its gradient and moments), so
    with 70 GB free one batched attack fits and two go one by one (no out-of-memory attempt first)."""
    import torch
    from transformers import AutoModelForCausalLM

    from mu_fast.models.shipped import shipped_config
    from mu_fast.sweep.session import ModelSession

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(shipped_config("llama-3-8b"))
    session = ModelSession.__new__(ModelSession)
    session.model, session.device = model, torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (70e9, 80e9))
    assert session._adapters_fit(1, 512) and not session._adapters_fit(2, 512)
    assert session._adapters_fit(16, 16)
