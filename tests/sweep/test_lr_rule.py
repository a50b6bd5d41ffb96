"""The learning-rate rule (mu_fast.sweep.lr_rule) on synthetic sweep records: which lr it picks and why."""

from __future__ import annotations

import math

import pytest
import torch

from mu_fast.data.sports import forget_rows
from mu_fast.sweep.lr_rule import REASONS, LRRule, candidates_of, choose_learning_rates


def record(method: str, lr: float, forget: float, maintain: float, seed: int = 0, status: str = "ok") -> dict:
    return {"config": {"method": method, "edit": {"lr": lr}, "seed": seed}, "status": status,
            "metrics": {"forget_err": forget, "maintain_acc": maintain} if status == "ok" else {}}


def test_smallest_lr_reaching_target_above_floor(rng):
    # Forget error rises with lr; maintain falls. Random jitter keeps the numbers fresh but the ordering fixed.
    lrs = [1e-3, 3e-3, 1e-2, 3e-2]
    jitter = (torch.rand(4, generator=rng) * 0.01).tolist()
    recs = [record("flu", lr, f, m) for lr, f, m in zip(lrs, [0.5 + jitter[0], 0.85, 0.95, 0.99],
                                                        [0.99, 0.97, 0.93 + jitter[1], 0.80])]
    choice = choose_learning_rates(recs, LRRule(forget_err_target=0.9, maintain_floor=0.9))["flu"]
    assert choice.lr == 1e-2 and choice.reason == REASONS[0]
    assert [c["lr"] for c in choice.candidates] == sorted(lrs)
    # A stricter floor excludes 1e-2: nothing reaches the target above 0.95, so the best forget error above it.
    stricter = choose_learning_rates(recs, LRRule(forget_err_target=0.9, maintain_floor=0.95))["flu"]
    assert stricter.lr == 3e-3 and stricter.reason == REASONS[1]


def test_means_over_seeds_decide(rng):
    # Seed 0 alone would reach the target at 1e-3; the mean over two seeds does not.
    recs = [record("atp", 1e-3, 0.95, 0.95, seed=0), record("atp", 1e-3, 0.70, 0.95, seed=1),
            record("atp", 1e-2, 0.92, 0.91, seed=0), record("atp", 1e-2, 0.94, 0.93, seed=1)]
    choice = choose_learning_rates(recs)["atp"]
    assert choice.lr == 1e-2
    first = choice.candidates[0]
    assert first["n"] == 2 and math.isclose(first["forget_err"], 0.825)


def test_every_method_gets_its_own_lr():
    recs = [record("flu", 1e-3, 0.95, 0.95), record("flu", 1e-2, 0.99, 0.9),
            record("ct", 1e-3, 0.3, 0.99), record("ct", 1e-2, 0.95, 0.92)]
    choices = choose_learning_rates(recs)
    assert {m: c.lr for m, c in choices.items()} == {"flu": 1e-3, "ct": 1e-2}


def test_failed_runs_are_never_chosen():
    recs = [record("random", 1e-2, 0, 0, status="failed"), record("random", 1e-3, 0.5, 0.95)]
    choice = choose_learning_rates(recs)["random"]
    assert choice.lr == 1e-3 and choice.reason == REASONS[1]
    assert candidates_of(recs, LRRule())["random"][1]["failed"] == 1


def test_maintain_below_floor_everywhere_takes_best_maintain():
    recs = [record("nonlocalized", 1e-3, 0.9, 0.5), record("nonlocalized", 1e-2, 1.0, 0.3)]
    choice = choose_learning_rates(recs)["nonlocalized"]
    assert choice.lr == 1e-3 and choice.reason == REASONS[2]


def test_all_failed_and_bad_input_are_clear_errors():
    with pytest.raises(ValueError, match="every lr swept for method 'ct' failed"):
        choose_learning_rates([record("ct", 1e-2, 0, 0, status="failed")])
    with pytest.raises(ValueError, match="config.edit.lr"):
        choose_learning_rates([{"config": {"method": "flu"}, "metrics": {}}])
    with pytest.raises(ValueError, match="maintain_floor must be a fraction"):
        LRRule(maintain_floor=90)


def test_validation_forget_set_is_disjoint_from_the_test_one():
    assert forget_rows("next_64", 600) == list(range(64, 128))
    assert not set(forget_rows("next_64", 600)) & set(forget_rows("first_64", 600))
    with pytest.raises(ValueError, match="needs 128 rows"):
        forget_rows("next_64", 100)


def test_edge_distance_and_near_edge_flag():
    # Two seeds per lr. 3e-3 misses the target by 0.05 (far), 1e-2 clears it by 0.05 and the floor by 0.08.
    recs = [record("flu", lr, f, m, seed=s) for s in (0, 1)
            for lr, f, m in ((3e-3, 0.75, 0.9), (1e-2, 0.85, 0.83))]
    rule = LRRule(forget_err_target=0.8, maintain_floor=0.75, margin=0.02)
    choice = choose_learning_rates(recs, rule)["flu"]
    assert choice.lr == 1e-2 and choice.edge_distance == pytest.approx(0.05) and not choice.near_edge
    assert choice.candidates[1]["forget_err_hw"] == 0.0  # identical seeds: no spread
    # The chosen lr clears the target by 0.01 < margin: near the edge.
    close = [record("flu", lr, f, m, seed=s) for s in (0, 1) for lr, f, m in ((3e-3, 0.7, 0.9), (1e-2, 0.81, 0.9))]
    choice = choose_learning_rates(close, rule)["flu"]
    assert choice.lr == 1e-2 and choice.edge_distance == pytest.approx(0.01) and choice.near_edge
    # Far from the thresholds in the mean, but the seeds disagree so much that the interval crosses the target.
    noisy = [record("flu", 1e-2, f, 0.9, seed=s) for s, f in enumerate((0.6, 1.0))]
    choice = choose_learning_rates(noisy, rule)["flu"]
    assert choice.edge_distance == pytest.approx(0.0) or choice.near_edge
    assert choice.candidates[0]["forget_err_hw"] > 0.2 and choice.near_edge


def test_a_failed_lower_rate_counts_by_its_largest_miss():
    # 3e-3 misses the target by 0.001 but the floor by 0.3: both would have to flip, so it is far from the edge.
    recs = [record("flu", lr, f, m, seed=s) for s in (0, 1)
            for lr, f, m in ((3e-3, 0.799, 0.45), (1e-2, 0.9, 0.85))]
    choice = choose_learning_rates(recs, LRRule(forget_err_target=0.8, maintain_floor=0.75))["flu"]
    assert choice.lr == 1e-2 and choice.edge_distance == pytest.approx(0.1) and not choice.near_edge
