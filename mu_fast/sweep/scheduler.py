"""The order in which a sweep's executors hand out runs (``mu_fast.sweep.engine`` and every executor use it): a free
worker takes the next run of the model it holds, else the first run of the model with the most runs left, so each
worker loads as few models as it can. Kept apart from the engine so that the executors (``mu_fast.sweep.processes``,
``mu_fast.sweep.ray_executor``), which the engine imports, import nothing from it."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from mu_fast.sweep.spec import RunConfig


class Scheduler:
    """Pending runs by model; ``next_for(model_key)`` keeps a worker on its model while that model has runs."""

    def __init__(self, runs: Iterable[RunConfig]):
        self.queues: OrderedDict[str, list[RunConfig]] = OrderedDict()
        for run in runs:
            self.queues.setdefault(run.model_key, []).append(run)

    def __len__(self) -> int:
        return sum(len(q) for q in self.queues.values())

    def next_for(self, model_key: str | None) -> RunConfig | None:
        if model_key in self.queues and self.queues[model_key]:
            return self._pop(model_key)
        if not len(self):
            return None
        return self._pop(max(self.queues, key=lambda k: len(self.queues[k])))

    def _pop(self, key: str) -> RunConfig:
        run = self.queues[key].pop(0)
        if not self.queues[key]:
            del self.queues[key]
        return run
