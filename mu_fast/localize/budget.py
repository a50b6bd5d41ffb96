"""The paper's budget rule counted by what a mask actually trains.

``mu_fast.masks.budget_match`` subtracts each component's own size. Under GQA at head granularity, query
heads of one KV group own the same key/value rows, so summing sizes counts those rows once per selected
head and the walk stops before the mask trains the budget. ``budget_match_trained`` subtracts instead what
each component adds to the parameters already chosen (its marginal size), so the mask's parameter count
equals the count the rule used.
"""

from __future__ import annotations

from collections.abc import Mapping

from mu_fast.models.sites import Component, SiteTable


class TrainedCount:
    """Running count of the distinct parameters selected by a set of components (rows, columns and whole
    tensors per parameter, overlaps counted once), without dense masks."""

    def __init__(self, table: SiteTable):
        self.table = table
        self.total = 0
        self._whole: set[str] = set()
        self._rows: dict[str, set[int]] = {}
        self._cols: dict[str, set[int]] = {}

    def _count(self, name: str) -> int:
        shape = self.table._shape_of_param(name)
        numel = 1
        for s in shape:
            numel *= s
        if name in self._whole:
            return numel
        rows, cols = len(self._rows.get(name, ())), len(self._cols.get(name, ()))
        if len(shape) == 1:
            return rows
        return rows * shape[1] + cols * shape[0] - rows * cols

    def add(self, component: Component) -> int:
        """Select ``component``; returns how many parameters it added (0 when all were already selected)."""
        added = 0
        for name, (kind, span) in self.table.selections(component).items():
            before = self._count(name)
            if kind == "whole":
                self._whole.add(name)
            elif kind == "rows":
                self._rows.setdefault(name, set()).update(span)
            else:
                self._cols.setdefault(name, set()).update(span)
            added += self._count(name) - before
        self.total += added
        return added


def budget_match_trained(scores: Mapping[Component, float], table: SiteTable, budget: int) -> tuple[list[Component], int]:
    """The paper's rule (rank by |score|, walk down until the budget is spent, keep every component with
    |score| at least the last one's) with each step costing the parameters it adds to those already chosen.

    Returns ``(components in descending |score| order, parameters they train)``; the count reaches the budget
    (unless everything scored is chosen) and overshoots it by less than the last component's marginal size
    (plus exact ties).
    """
    if budget <= 0:
        raise ValueError(f"budget must be a positive parameter count; got {budget}")
    if not scores:
        raise ValueError("the budget rule needs at least one scored component; the score dict is empty")
    ordered = sorted(scores, key=lambda c: (-abs(float(scores[c])), c))
    counter = TrainedCount(table)
    for walked, comp in enumerate(ordered, start=1):
        counter.add(comp)
        if counter.total >= budget:
            threshold = abs(float(scores[comp]))
            break
    else:  # the budget exceeds everything scored
        return ordered, counter.total
    # Sorted by |score|, the kept components are a prefix of the walk: add the exact ties after it.
    chosen = [c for c in ordered if abs(float(scores[c])) >= threshold]
    for comp in chosen[walked:]:
        counter.add(comp)
    return chosen, counter.total
