"""Sweep runs without a model: a fake ``mu_fast.sweep.worker.Worker`` whose records carry numbers made from the run's
seed, so that tests of the store, the report and the driver lock run in a second."""

from __future__ import annotations

from typing import Any

SPEC: dict[str, Any] = {
    "name": "fake", "models": ["organism:ci"], "tasks": [{"dataset": "organism"}], "methods": ["flu", "atp"],
    "edit": {"preset": "organism", "steps": 2, "lr": 1e-3}, "seeds": [0, 1], "evaluations": {"formats": ["normal"]},
}


def fake_record(config: dict[str, Any]) -> dict[str, Any]:
    """An ok record of the run ``config`` (``RunConfig.to_dict()``): forget error 0.1 + seed / 10."""
    return {"format": 1, "run_id": config["run_id"], "config": dict(config), "status": "ok",
            "metrics": {"forget_err": 0.1 + config["seed"] / 10, "maintain_acc": 0.9},
            "before": {"forget_err": 0.01, "maintain_acc": 0.99}, "timings": {"total": 1.0}}


class FakeWorker:
    """Stands in for ``mu_fast.sweep.worker.Worker``; ``executed`` lists the run ids it ran."""

    executed: list[str] = []
    model_key = None

    def __init__(self, *args: Any) -> None:
        pass

    def execute(self, run_data: dict[str, Any]) -> dict[str, Any]:
        FakeWorker.executed.append(run_data["run_id"])
        return fake_record(run_data)
