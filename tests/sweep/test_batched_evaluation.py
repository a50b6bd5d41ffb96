"""ModelSession.execute_batch scores the formats of a batch's runs in one pass (``evaluate_task_variants``) and
collects their probe features in one pass (``probe_features_variants``): the records equal those of the same batch
evaluated run by run (every evaluation leaf, probe accuracy and metric, fp64: 1e-9), the batch's evaluation time is
split evenly over its runs, and a failing batched pass falls back to per-run evaluation.
The end-to-end check against runs alone is tests/sweep/test_batches.py."""

from __future__ import annotations

import pytest

from mu_fast import sweep
from mu_fast.sweep.session import ModelSession

TOL = 1e-9


def _runs():
    return sweep.expand({
        "name": "v", "models": [{"name": "organism:ci", "dtype": "fp64"}],
        "tasks": [{"dataset": "organism", "forget_splits": ["first_16_unsplit"]}], "methods": ["flu", "random"],
        "edit": {"preset": "organism", "steps": 2, "lr": [1e-2, 3e-2]}, "seeds": [0],
        "evaluations": {"formats": "all", "batch_size": 16, "relearn": False, "probes": {"steps": 20}}})


def _same_evals(a, b):
    assert set(a) == set(b)
    for fmt in a:
        for split, metrics in a[fmt].items():
            for key, value in metrics.items():
                other = b[fmt][split][key]
                assert other == value if value is None or key == "n" else other == pytest.approx(value, abs=TOL), \
                    (fmt, split, key)


def test_batched_evaluation_equals_per_run_evaluation(organism_cache):
    runs = _runs()
    session = ModelSession(runs[0].model, "cpu")
    batched = list(session.execute_batch(runs, batched_probe_features=True))  # on a CPU only when asked
    per_run = list(session.execute_batch(runs, batched_evaluation=False))
    default = list(session.execute_batch(runs[:2]))
    assert all(r["batch"]["evaluate_seconds"] > 0 and r["batch"]["probe_features_seconds"] is None for r in default)
    assert [r["status"] for r in batched + per_run] == ["ok"] * 8, [r.get("error") for r in batched + per_run]
    seconds = batched[0]["batch"]["evaluate_seconds"]
    assert seconds > 0 and all(r["batch"]["evaluate_seconds"] == seconds for r in batched)
    assert batched[0]["batch"]["probe_features_seconds"] > 0
    moved = 0.0
    for a, b in zip(batched, per_run, strict=True):
        assert a["run_id"] == b["run_id"] and b["batch"]["evaluate_seconds"] is b["batch"]["probe_features_seconds"] is None
        assert a["timings"]["evaluate"] == pytest.approx(seconds / len(runs))
        assert set(a["timings"]) == set(b["timings"]) and set(a["results"]) == set(b["results"])
        _same_evals(a["results"]["evals"], b["results"]["evals"])
        probes_a, probes_b = a["results"]["latent_probes"], b["results"]["latent_probes"]
        assert set(probes_a) == set(probes_b)
        for key, value in probes_b.items():
            if key in ("probe_acc", "forget_acc_true", "forget_acc_edit") and value is not None:
                assert probes_a[key] == pytest.approx(value, abs=TOL), key
            else:
                assert probes_a[key] == value, key
        assert set(a["metrics"]) == set(b["metrics"])
        for key, value in b["metrics"].items():
            if key != "seconds":
                assert a["metrics"][key] == pytest.approx(value, abs=TOL), key
        moved = max(moved, abs(a["metrics"]["forget_err"] - a["before"]["forget_err"]))
    assert moved > 1e-3  # the runs' edits changed what is scored


def test_a_failing_batched_evaluation_falls_back_to_per_run(organism_cache, monkeypatch):
    import mu_fast.evaluate

    def fail(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    import mu_fast.evaluate.probes

    monkeypatch.setattr(mu_fast.evaluate, "evaluate_task_variants", fail)
    monkeypatch.setattr(mu_fast.evaluate.probes, "probe_features_variants", fail)
    runs = _runs()[:2]
    records = list(ModelSession(runs[0].model, "cpu").execute_batch(runs, batched_probe_features=True))
    assert [r["status"] for r in records] == ["ok", "ok"], [r.get("error") for r in records]
    assert all(r["batch"]["evaluate_seconds"] is None and r["batch"]["probe_features_seconds"] is None
               and r["timings"]["evaluate"] > 0 and r["results"]["latent_probes"]["probe_acc"] for r in records)
