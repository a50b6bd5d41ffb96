"""Report tables and plots from records (mean ± std over seeds, ≤ 100 columns), and dry_run's estimates."""

from __future__ import annotations

import statistics

import pytest

from mu_fast.sweep import report
from mu_fast.sweep.estimate import dry_run
from mu_fast.sweep.store import Store


def fake_records(rng_values, methods=("flu", "a_very_long_method_name_that_must_be_cut_to_fit_the_table"),
                 lrs=(1e-3, 3e-3), seeds=(0, 1, 2)):
    records, values = [], {}
    it = iter(rng_values)
    for method in methods:
        for lr in lrs:
            for seed in seeds:
                metrics = {k: next(it) for k in ("forget_err", "maintain_acc", "mcq_forget_err", "relearn_acc",
                                                   "probe_true_acc")}
                qa = next(it)
                values[(method, lr, seed)] = {**metrics, "qa_forget_err": 1.0 - qa}
                records.append({
                    "run_id": f"{method}{lr}{seed}", "status": "ok",
                    "config": {"run_id": f"{method}{lr}{seed}", "model": {"ref": "organism:ci"}, "method": method,
                               "seed": seed, "axes": {"lr": lr},
                               "task": {"dataset": "organism", "forget_split": "first_16_unsplit",
                                        "inject_label": "random_without_golf"}, "edit": {"lr": lr}},
                    "metrics": {**metrics, "trainable_params": 10},
                    "results": {"evals": {"qa": {"forget": {"acc": qa}}}},
                    "before": {"forget_err": 0.01, "maintain_acc": 0.99, "mcq_forget_err": 0.05},
                    "localization": {"components": ["m0"] if seed == 0 else [f"m{seed}"]},
                })
    return records, values


def test_table_is_mean_std_over_seeds_within_100_columns(rng):
    import torch

    records, values = fake_records(torch.rand(200, generator=rng, dtype=torch.float64).tolist())
    text = report.format_table(records)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 100
    assert lines[3].startswith("(before edit)") and "0.01" in lines[3]
    row = next(line for line in lines if line.startswith("flu lr=0.003"))
    for column, (key, _) in enumerate(report.COLUMNS):
        seeds = [values[("flu", 3e-3, s)][key] for s in range(3)]
        expected = f"{statistics.fmean(seeds):.2f}±{statistics.stdev(seeds):.2f}"
        assert row.split()[2 + column] == expected, key
    assert any("…" in line for line in lines)  # the long label was cut, not the columns
    assert lines[-2].startswith("note: a_very_long_method_name") and "same components as flu" in lines[-2]
    tables = report.rich_tables(records)
    assert len(tables) == 1 and tables[0].row_count == 1 + 4


def test_write_report_writes_table_and_plots(rng, tmp_path):
    import torch

    records, _ = fake_records(torch.rand(200, generator=rng, dtype=torch.float64).tolist())
    store = Store(tmp_path / "r.jsonl")
    for r in records:
        store.append(r)
    store.append({"run_id": "broken", "status": "failed", "config": {"run_id": "broken"}, "error": {"type": "X"}})
    # failed runs are not reported
    out = report.write_report(store.path, tmp_path / "report")
    assert out["table"].read_text().startswith("organism:ci · organism:first_16_unsplit")
    assert len(out["plots"]) == 3 and all(p.stat().st_size > 5000 for p in out["plots"])


def test_dry_run_guesses_then_measures(tmp_path):
    spec = {"models": ["organism:ci"], "tasks": [{"dataset": "organism"}], "methods": ["flu", "random"],
            "edit": {"steps": 10, "lr": [1e-3, 2e-3]}, "seeds": [0, 1]}
    store = tmp_path / "r.jsonl"
    first = dry_run(spec, store=store, print_fn=None)
    assert len(first.runs) == len(first.pending) == 8
    assert {source for _, source in first.seconds.values()} == {"guess"}
    done = first.runs[0]
    Store(store).append({"run_id": done.run_id, "status": "ok", "config": done.to_dict(),
                         "timings": {"total": 123.0}, "session": {"load_seconds": 7.0, "runs_before": 0}})
    second = dry_run(spec, store=store, print_fn=None)
    assert len(second.pending) == 7 and second.seconds[("organism:ci", done.method)] == (123.0, "measured")
    assert second.total_seconds == pytest.approx(3 * 123.0 + 4 * second.seconds[("organism:ci", "random")][0] + 7.0
                                                 + second.train_seconds.get("organism:ci", 0.0))  # if not cached
    lines = []
    dry_run(spec, store=store, print_fn=lines.append)
    assert "8 runs, 1 already stored, 7 to run" in lines[0] and sum(done.run_id in x for x in lines) == 0


def test_dry_run_plans_memory_of_a_shipped_model(tmp_path):
    spec = {"models": [{"name": "random:llama-3-8b", "tokenizer": str(tmp_path)}], "tasks": [{"dataset": "sports"}],
            "methods": ["flu", "all_mlps", "nonlocalized", "paper:ap"], "edit": {"lm_coef": 0}}
    est = dry_run(spec, store=tmp_path / "none.jsonl", print_fn=None)
    assert est.memory[("random:llama-3-8b", "paper:ap")][1] == "the paper's selection"
    assert est.memory[("random:llama-3-8b", "flu")][1] == "stand-in: 4 MLP layers"  # the paper's FLU layers 1-4
    peaks = {method: est.memory[("random:llama-3-8b", method)][0] for method in ("flu", "all_mlps", "nonlocalized")}
    # more trained parameters need more memory; an 8B model in bf16 needs more than its 16 GB of weights
    assert 16e9 < peaks["flu"] < peaks["all_mlps"] < peaks["nonlocalized"]
    assert est.seconds[("random:llama-3-8b", "flu")][1] == "guess"
