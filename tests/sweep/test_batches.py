"""Runs trained together in the sweep engine (``batch:``): the same records as alone, units, resume, executors."""

from __future__ import annotations

import pytest
import torch

from mu_fast import sweep
from mu_fast.sweep.batches import RunBatch, batchable, group

# fp64: the batched edit adds x·D to x·W0 where the single edit multiplies by W0 + D, and its AdamW is torch's
# formula where the single run uses MaskedAdamW; in fp64 every metric agrees to ~1e-15 (measured: 3.3e-16 on the CI
# organism, 4 methods x 2 seeds, relearning and probes included), so 1e-9 leaves room and still catches any bug.
TOL = 1e-9


def _spec(seeds=(0, 1), methods=("flu", "atp", "random", "all_mlps"), **extra):
    return {"name": "b", "models": [{"name": "organism:ci", "dtype": "fp64"}],
            "tasks": [{"dataset": "organism", "forget_splits": ["first_16_unsplit"]}], "methods": list(methods),
            "edit": {"preset": "organism", "steps": 3, "lr": [3e-3, 1e-2]}, "seeds": list(seeds),
            "evaluations": {"formats": ["normal", "mcq"], "relearn": {"steps": 2, "lr": 1e-3, "lora_rank": 4},
                            "probes": {"steps": 10}}, **extra}


def _records(path):
    return {r["run_id"]: r for r in sweep.load_results(path, status=None)}


def _same(a, b):
    assert a["status"] == b["status"] == "ok", (a.get("error"), b.get("error"))
    assert a["config"] == b["config"] and a["localization"]["components"] == b["localization"]["components"]
    for key, value in a["metrics"].items():
        if key != "seconds":
            assert b["metrics"][key] == pytest.approx(value, abs=TOL), key
    for x, y in zip(a["edit"]["history"], b["edit"]["history"], strict=True):
        for key in ("forget_loss", "maintain_loss", "lm_loss"):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=TOL, abs=TOL), key
        # the run alone reports MaskedAdamW's gradient norm, which it sums in fp32
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-6)


def test_units_group_runs_of_one_model_task_and_evaluations():
    runs = sweep.expand(_spec(seeds=(0, 1, 2)))  # 4 methods x 2 lrs x 3 seeds = 24
    units = group(runs, 8)
    assert [len(u.runs) if isinstance(u, RunBatch) else 1 for u in units] == [8, 8, 8]
    assert [r.run_id for u in units for r in u.runs] == [r.run_id for r in runs]  # order kept, each once
    assert group(runs, 1) == runs
    assert [len(u.runs) if isinstance(u, RunBatch) else 1 for u in group(runs[:9], 4)] == [4, 4, 1]
    eight_bit = sweep.expand(_spec(seeds=(0,), edit={"preset": "organism", "steps": 3, "state_bits": 8}))
    assert not any(batchable(r) for r in eight_bit) and group(eight_bit, 8) == eight_bit
    other = sweep.expand({**_spec(seeds=(0,)), "evaluations": {"formats": ["normal"]}})
    mixed = group([runs[0], other[0], runs[1], other[1]], 8)
    assert sorted(len(u.runs) for u in mixed) == [2, 2]  # by evaluation settings, not by position
    with pytest.raises(ValueError, match="positive integer or auto"):
        sweep.expand({**_spec(), "batch": 0})


@pytest.fixture(scope="module")
def alone(tmp_path_factory, ci_organism):
    store = tmp_path_factory.mktemp("alone") / "s.jsonl"
    sweep.run(_spec(), store=store, batch=1, progress=False, threads=1)
    return _records(store)


def test_a_batched_sweep_writes_the_records_of_its_runs_alone(alone, tmp_path):
    """4 methods (whole MLPs, attention heads and MLPs, random rows/columns/heads, every MLP) x 2 lrs x 2 seeds in
    batches of 8 (mixed masks, lrs and seeds in one pass): every record as the run alone, each with its batch."""
    store = tmp_path / "s.jsonl"
    result = sweep.run(_spec(), store=store, batch=8, progress=False, threads=1)
    assert result.ok == 16 and result.failed == 0
    batched = _records(store)
    assert set(batched) == set(alone)
    for run_id, record in batched.items():
        _same(alone[run_id], record)
        assert record["batch"]["size"] == 8 and 0 <= record["batch"]["index"] < 8
    assert "batch" not in next(iter(alone.values()))


def test_a_batched_sweep_with_batched_relearning_writes_the_records_of_its_runs_alone(alone, tmp_path, monkeypatch):
    """The same with the batch's relearning attacks trained together (``relearn_attack_variants``, on a CPU only when
    asked): every record as the run alone, every relearning loss and evaluation included."""
    from mu_fast.sweep.session import ModelSession
    from tests.sweep.test_batched_relearn import _same_relearn

    execute_batch = ModelSession.execute_batch
    monkeypatch.setattr(ModelSession, "execute_batch",
                        lambda self, runs, **kw: execute_batch(self, runs, **{**kw, "batched_relearn": True}))
    store = tmp_path / "s.jsonl"
    result = sweep.run(_spec(seeds=(0,)), store=store, batch=8, progress=False, threads=1)
    assert result.ok == 8 and result.failed == 0
    for run_id, record in _records(store).items():
        _same(alone[run_id], record)
        _same_relearn(record["results"]["relearn"], alone[run_id]["results"]["relearn"])
        assert record["batch"]["relearn_seconds"] > 0


def test_a_unit_larger_than_the_device_holds_trains_in_parts(alone, tmp_path, monkeypatch):
    """Where the memory plan fits 3 configurations (as on a GPU: ``device_plan``), a unit of 8 trains as batched
    edits of 3, 3 and 2 with the plan's groups per pass, and every record is still the run alone."""
    import mu_fast.sweep.batches as batches

    seen = []

    def plan(model, masks, configs, device):
        seen.append(len(masks))
        return 3, 2

    monkeypatch.setattr(batches, "device_plan", plan)
    store = tmp_path / "s.jsonl"
    result = sweep.run(_spec(seeds=(0,)), store=store, batch=8, progress=False, threads=1)
    assert result.ok == 8 and seen == [8]
    records = list(_records(store).values())
    assert sorted(r["batch"]["size"] for r in records) == [2, 2, 3, 3, 3, 3, 3, 3]
    for record in records:
        _same(alone[record["run_id"]], record)


def test_a_killed_batched_sweep_resumes(alone, tmp_path):
    """The store cut after 5 of 16 records (a kill in the middle of the first batch): the rerun runs the 11 others
    only (in new batches), keeps the 5 lines as they were, and every record is as the run alone."""
    full = tmp_path / "full.jsonl"
    sweep.run(_spec(), store=full, batch=8, progress=False, threads=1)
    lines = full.read_text().splitlines()
    cut = tmp_path / "cut.jsonl"
    cut.write_text("\n".join(lines[:5]) + "\n")
    started = []
    result = sweep.run(_spec(), store=cut, batch=8, progress=False, threads=1,
                       on_run_start=lambda run: started.append(run.run_id))
    assert result.skipped == 5 and result.ok == 11 and len(started) == 11
    assert cut.read_text().splitlines()[:5] == lines[:5]
    resumed = _records(cut)
    assert len(resumed) == 16
    for run_id, record in resumed.items():
        _same(alone[run_id], record)


def test_worker_processes_run_batches(alone, tmp_path):
    """The processes executor hands out batches and stores each run's record as it comes."""
    store = tmp_path / "s.jsonl"
    spec = _spec(methods=("flu", "random"))
    result = sweep.run(spec, store=store, batch=4, executor="processes", workers=2, threads=1, progress=False)
    assert result.ok == 8
    for run_id, record in _records(store).items():
        _same(alone[run_id], record)
        assert record["batch"]["size"] == 4


def test_a_run_the_batched_edit_refuses_runs_alone(tmp_path, ci_organism):
    """A batch the batched edit cannot train (here: a model parameter kind it refuses, simulated) runs each of its
    runs alone: no run fails because it was batched."""
    import mu_fast.edit.batched as batched

    real = batched.edit_batched

    def refuse(*args, **kwargs):
        raise ValueError("refused for the test")

    batched.edit_batched = refuse
    try:
        store = tmp_path / "s.jsonl"
        spec = {**_spec(methods=("flu",), seeds=(0,)), "evaluations": {"formats": ["normal"]}}
        result = sweep.run(spec, store=store, batch=4, progress=False, threads=1)
    finally:
        batched.edit_batched = real
    records = _records(store)
    assert result.ok == 2 and all("batch" not in r and r["status"] == "ok" for r in records.values())
    assert set(records) == {r.run_id for r in sweep.expand(spec)}


def test_auto_batches_on_gpus_and_runs_alone_on_a_cpu(monkeypatch):
    """``batch: auto`` (the default): units of AUTO_BATCH where the runs execute on a GPU, each run alone on a CPU."""
    import torch

    from mu_fast.sweep.engine import AUTO_BATCH, resolve_batch

    assert resolve_batch(4, "local") == 4 and resolve_batch(1, "gpus") == 1
    assert resolve_batch("auto", "gpus") == AUTO_BATCH
    assert resolve_batch("auto", "processes") == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_batch("auto", "local") == 1 and resolve_batch("auto", "ray") == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_batch("auto", "local") == AUTO_BATCH


def test_device_plan_on_a_cpu_takes_the_unit_one_group_per_pass():
    from mu_fast.sweep.batches import device_plan

    assert device_plan(None, [object()] * 5, [object()] * 5, torch.device("cpu")) == (5, 1)
