"""One learning-rate rule for every localization method, applied to a sweep's records.

The paper chose each method's learning rate from a sweep (reference/authors_repo.md §3.4). Comparing methods at
hand-picked rates confounds the comparison (a method can look robust only because its rate was lower), so mu_fast
chooses them all with one stated rule (``LRRule``):

    for each method, the smallest learning rate of the grid whose mean forget error is at least ``forget_err_target``
    while the mean maintain accuracy stays at or above ``maintain_floor``; measured in the training format only, on a
    *validation* forget set (``next_64``: the 64 facts after ``first_64``, disjoint from the forget set the report
    tests on), never on the test formats (Q/A, MCQ, relearning, probes).

When no rate reaches the target the rule takes the rate with the highest forget error among those that keep
maintain above the floor (reason ``"target not reached"``); when none keeps maintain, the rate with the highest
maintain accuracy (``"maintain below floor"``). Every choice records its reason and the candidate numbers, so a
report can show why.

**Not a knife edge.** A threshold rule flips when a mean lands near its threshold, and then a round-off or one more
seed picks another rate. Each candidate carries the 95% t interval of its means over the seeds, and each choice its
*edge distance*: over the candidates the decision looked at (every rate up to the chosen one), the smallest distance
between a mean and the threshold it was compared with. A choice is ``near_edge`` when that distance is below the
rule's stated ``margin`` (0.02: about one fact in 64 on each of the seeds) or below the interval's half-width (the
seeds cannot tell on which side the rate is); reports print such choices with a mark, and the demo shows how its
answer moves between the chosen rate and its neighbours.

    records = sweep.load_results("sweeps/organism_lr.jsonl")
    choices = choose_learning_rates(records, LRRule())     # {method: LRChoice}
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

REASONS = ("smallest lr reaching the target", "target not reached", "maintain below floor")


@dataclass(frozen=True)
class LRRule:
    """The rule (module docstring). Metrics are record summary keys (``mu_fast.sweep.one_run.summarize``)."""

    forget_err_target: float = 0.9
    maintain_floor: float = 0.9
    forget_metric: str = "forget_err"
    maintain_metric: str = "maintain_acc"
    margin: float = 0.02

    def __post_init__(self) -> None:
        for name in ("forget_err_target", "maintain_floor", "margin"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise ValueError(f"LRRule.{name} must be a fraction in [0, 1]; got {value!r}")

    def describe(self) -> str:
        """The rule in one sentence, for reports."""
        return (f"per method, the smallest lr whose mean {self.forget_metric} >= {self.forget_err_target:g} while mean "
                f"{self.maintain_metric} >= {self.maintain_floor:g} (training format, validation forget set); "
                f"else the highest {self.forget_metric} above the floor; else the highest {self.maintain_metric}; "
                f"near the edge when a mean is within {self.margin:g} of its threshold")


@dataclass
class LRChoice:
    """What the rule chose for one method: ``lr``, ``reason`` (one of ``REASONS``) and ``candidates``: per lr
    (ascending) the mean forget error and maintain accuracy over ``n`` seeds."""

    method: str
    lr: float
    reason: str
    candidates: list[dict[str, float]] = field(default_factory=list)
    edge_distance: float = math.inf  # smallest |mean - threshold| over the candidates the decision compared
    near_edge: bool = False  # edge_distance below the margin or below that candidate's 95% half-width

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.fmean(finite) if finite else math.nan


def _half_width(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) < 2:
        return 0.0
    from mu_fast.stats import t_interval

    return t_interval(finite).half_width


def candidates_of(records: Iterable[Mapping[str, Any]], rule: LRRule) -> dict[str, list[dict[str, float]]]:
    """``{method: [{"lr", "forget_err", "maintain_acc", "n", "forget_err_hw", "maintain_acc_hw"}, ...]}`` (ascending
    lr): means over seeds of the ``ok`` records and the half-widths of their 95% t intervals (0 for one seed). A record whose metrics lack either number is left out; a failed run (diverged) counts as failing the
    floor, so its lr can never be chosen over one that ran."""
    by_method: dict[str, dict[float, dict[str, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for record in records:
        config = record.get("config") or {}
        method, lr = config.get("method"), (config.get("edit") or {}).get("lr")
        if method is None or lr is None:
            raise ValueError("a record without config.method or config.edit.lr was passed to the lr rule; pass the "
                             "records of a sweep (mu_fast.sweep.load_results(store, status=None))")
        cell = by_method[str(method)][float(lr)]
        if record.get("status", "ok") != "ok":
            cell["failed"].append(1.0)
            continue
        metrics = record.get("metrics") or {}
        forget, maintain = metrics.get(rule.forget_metric), metrics.get(rule.maintain_metric)
        if isinstance(forget, (int, float)) and isinstance(maintain, (int, float)):
            cell["forget"].append(float(forget))
            cell["maintain"].append(float(maintain))
    out: dict[str, list[dict[str, float]]] = {}
    for method, cells in by_method.items():
        rows = []
        for lr in sorted(cells):
            cell = cells[lr]
            n = len(cell["forget"])
            if cell["failed"] or n == 0:
                rows.append({"lr": lr, "forget_err": math.nan, "maintain_acc": math.nan, "n": n,
                             "failed": len(cell["failed"])})
            else:
                rows.append({"lr": lr, "forget_err": _mean(cell["forget"]), "maintain_acc": _mean(cell["maintain"]),
                             "n": n, "forget_err_hw": _half_width(cell["forget"]),
                             "maintain_acc_hw": _half_width(cell["maintain"])})
        out[method] = rows
    return out


def choose(method: str, rows: list[dict[str, float]], rule: LRRule) -> LRChoice:
    """Apply ``rule`` to one method's candidate rows (``candidates_of``)."""
    if not rows:
        raise ValueError(f"the lr rule has no candidates for method {method!r}; sweep at least one lr for it")
    ran = [r for r in rows if not r.get("failed") and math.isfinite(r["forget_err"])]
    above = [r for r in ran if r["maintain_acc"] >= rule.maintain_floor]
    reaching = [r for r in above if r["forget_err"] >= rule.forget_err_target]
    if reaching:
        best, reason = min(reaching, key=lambda r: r["lr"]), REASONS[0]
    elif above:
        best, reason = max(above, key=lambda r: (r["forget_err"], -r["lr"])), REASONS[1]
    elif ran:
        best, reason = max(ran, key=lambda r: (r["maintain_acc"], -r["lr"])), REASONS[2]
    else:
        raise ValueError(f"every lr swept for method {method!r} failed; lower the grid's learning rates")
    distance, near = _edge(ran, float(best["lr"]), rule)
    return LRChoice(method, float(best["lr"]), reason, rows, distance, near)


def _edge(ran: list[dict[str, float]], chosen: float, rule: LRRule) -> tuple[float, bool]:
    """The edge distance and whether it is near the edge (``LRChoice``). A rate below the chosen one failed: it
    would flip only if every threshold it missed flipped (its largest miss counts); the chosen rate flips if any
    of its comparisons does (its smallest gap counts)."""
    distance, near = math.inf, False
    for row in ran:
        if row["lr"] > chosen:
            continue
        gaps = []
        for key, threshold in ((rule.forget_metric, rule.forget_err_target), (rule.maintain_metric, rule.maintain_floor)):
            gap = row[key] - threshold
            gaps.append((abs(gap), gap >= 0, max(rule.margin, row.get(f"{key}_hw", 0.0))))
        missed = [g for g in gaps if not g[1]]
        gap, _, tolerance = max(missed) if row["lr"] < chosen and missed else min(gaps)
        distance = min(distance, gap)
        near = near or gap < tolerance
    return distance, near


def choose_learning_rates(records: Iterable[Mapping[str, Any]], rule: LRRule | None = None) -> dict[str, LRChoice]:
    """``{method: LRChoice}`` for every method in ``records`` (a sweep over lr on the validation forget set)."""
    rule = rule or LRRule()
    return {method: choose(method, rows, rule) for method, rows in sorted(candidates_of(records, rule).items())}
