"""End-to-end pipeline on a tiny random model and a hand-made task: every stage runs and writes its report."""

import json

import pytest

from mu_fast.edit import EditConfig
from mu_fast.evaluate.known_facts import UnknownFactsError, UnknownFactsWarning
from mu_fast.localize import localize
from mu_fast.models.sites import Component, SiteTable
from mu_fast.models.tiny import make_tiny_model
from mu_fast.pipeline import RunOptions, compare_localizations
from mu_fast.models.identity import config_hash
from mu_fast.provenance import numerics, provenance_block
from tests._tiny_task import tiny_task, word_tokenizer


@pytest.fixture(scope="module")
def setup():
    tok = word_tokenizer()
    model = make_tiny_model("llama", vocab_size=len(tok), num_hidden_layers=3, initializer_range=0.3)
    return model, tok, tiny_task()


def test_localize_methods_respect_the_budget_rule(setup):
    model, tok, task = setup
    table = SiteTable(model)
    flu = localize("flu", model, tok, task)
    budget = flu.budget
    assert budget == len(flu.components) * table.component_size(Component("mlp", 0))
    for method in ("atp", "random", "random_mlps", "all_mlps", "nonlocalized"):
        loc = localize(method, model, tok, task, budget=budget if method != "random_mlps" else None)
        n = loc.mask.param_count()
        if method in ("atp", "random"):
            # budget matching overshoots by at most one component (largest: a whole MLP)
            assert budget <= n < budget + table.component_size(Component("mlp", 0)) + table.component_size(Component("attn", 0))
        if method == "random_mlps":
            assert len(loc.components) == len(flu.components)
        if method == "nonlocalized":
            assert n == sum(table.component_size(Component(k, L)) for L in range(3) for k in ("attn", "mlp"))
    with pytest.raises(ValueError, match="unknown localization method"):
        localize("magic", model, tok, task)


def _store(folder):
    return [json.loads(line) for line in (folder / "runs.jsonl").read_text().splitlines()]


def test_compare_localizations_writes_results_and_resumes(setup, tmp_path):
    model, tok, task = setup
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    configs = {m: EditConfig(steps=2, lr=1e-2, lm_batch=4, maintain_batch=8) for m in ("flu", "atp", "all_mlps")}
    options = RunOptions(relearn=True, relearn_steps=2, relearn_rank=8, probes=True)
    with pytest.warns(UnknownFactsWarning, match="RUNNING ANYWAY"):  # a random model knows no facts
        results = compare_localizations(model, tok, task, list(configs), configs, options, out_dir=tmp_path,
                                        progress=False, allow_unknown_facts=True)
    for name, p in model.named_parameters():
        assert p.equal(before[name]), f"compare_localizations modified the caller's model ({name})"
        assert p.requires_grad == flags[name], f"compare_localizations changed requires_grad of {name}"
    records = _store(tmp_path)  # the sweep store: one record per method (one seed)
    assert sorted(r["config"]["method"] for r in records) == sorted(configs)
    for record in records:
        method, summary = record["config"]["method"], record["metrics"]
        assert record["status"] == "ok" and record["config"]["task"]["dataset"] == "memory"
        assert 0.0 <= summary["forget_err"] <= 1.0 and "relearn_acc" in summary and "probe_true_acc" in summary
        assert summary["trainable_params"] == results["methods"][method]["localization"]["trainable_params"] > 0
        assert results["methods"][method]["runs"]["0"]["summary"] == summary
    for plot in ("probe_accuracy.png", "localization_map.png", "robustness.png"):
        assert (tmp_path / plot).stat().st_size > 1000
    # A rerun with the same settings reuses every finished run: the store gains no line.
    text = (tmp_path / "runs.jsonl").read_text()
    again = compare_localizations(model, tok, task, list(configs), configs, options, out_dir=tmp_path, progress=False,
                                  allow_unknown_facts=True)
    assert (tmp_path / "runs.jsonl").read_text() == text
    assert again["summary"]["atp"] == results["summary"]["atp"]
    saved = json.loads((tmp_path / "results.json").read_text())
    prov = saved["provenance"]
    assert numerics(prov) == numerics(provenance_block()) and not saved["known_facts"]["ok"]
    assert prov["model"]["config_hash"] == config_hash(model.config) and prov["model"]["arch"] == "llama"
    assert saved["methods"]["atp"]["provenance"]["versions"] == prov["versions"]
    assert "mL.N" in saved["legend"]["components"]


def test_other_weights_or_facts_are_never_taken_from_the_store(setup, tmp_path):
    """Runs are named by the weights' and the task's digests: a changed model or task runs anew in the same folder,
    and resume=False sets the store aside (renamed, not deleted) and runs again."""
    import copy

    model, tok, task = setup
    configs = {"all_mlps": EditConfig(steps=1, lr=1e-2, lm_batch=4, maintain_batch=8)}
    options = RunOptions(relearn=False, probes=False)

    def run(m=model, t=task, resume=True):
        with pytest.warns(UnknownFactsWarning):
            compare_localizations(m, tok, t, ["all_mlps"], configs, options, out_dir=tmp_path, progress=False,
                                  allow_unknown_facts=True, resume=resume)
        return _store(tmp_path)

    assert len(run()) == 1 and len(run()) == 1
    other = copy.deepcopy(model)
    with __import__("torch").no_grad():
        other.model.layers[0].mlp.up_proj.weight[0, 0] += 1.0
    assert len(run(other)) == 2
    changed = copy.deepcopy(task)
    changed.lm_texts = ["other filler text"] + list(changed.lm_texts)
    assert len(run(t=changed)) == 3
    assert len(run(resume=False)) == 1
    assert len(list(tmp_path.glob("runs.*.jsonl"))) == 1  # the earlier store, kept


def test_unknown_facts_are_refused_before_any_method(setup, tmp_path):
    model, tok, task = setup  # a random model: accuracy at chance, and the tiny tokenizer does not know "Fact:"
    configs = {"flu": EditConfig(steps=1)}
    with pytest.raises(UnknownFactsError, match="allow_unknown_facts=True"):
        compare_localizations(model, tok, task, ["flu"], configs, RunOptions(), out_dir=tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []  # nothing localized, edited or written


def test_progress_shows_every_stage(setup, capsys):
    model, tok, task = setup
    configs = {"all_mlps": EditConfig(steps=1, lr=1e-2, lm_batch=4, maintain_batch=8)}
    options = RunOptions(relearn=True, relearn_steps=1, relearn_rank=4, probes=True)
    with pytest.warns(UnknownFactsWarning):
        compare_localizations(model, tok, task, ["all_mlps"], configs, options, progress=True, allow_unknown_facts=True)
    captured = capsys.readouterr()
    assert "sweep compare" in captured.err and "1/1" in captured.err  # the engine's bar over the runs
    assert "Components:" in captured.out and all(len(line) <= 100 for line in captured.out.splitlines())


def test_same_selection_notes_flag_repeated_rows():
    from mu_fast.aggregate import same_selection_notes

    methods = {
        "flu": {"localization": {"components": ["m0"]}},
        "atp": {"localization": {"components": ["a1.h0", "m2"]}},
        "random_mlps": {"localization": {"components": ["m0"]}},
        "ct": {"localization": {"components": ["m2", "a1.h0"]}},
    }
    notes = same_selection_notes(methods)
    assert len(notes) == 2
    assert notes[0].startswith("random_mlps selected the same components as flu")
    assert notes[1].startswith("ct selected the same components as atp")
    assert same_selection_notes({"flu": methods["flu"], "atp": methods["atp"]}) == []


def test_seeds_give_mean_and_std_per_method(setup, tmp_path, capsys):
    """Several seeds: one store record per method and seed, the aggregate is their mean ± sample std, and every seed's
    selection is kept (random draws anew per seed); the printed table shows mean±std cells."""
    import statistics

    model, tok, task = setup
    configs = {m: EditConfig(steps=2, lr=1e-2, lm_batch=4, maintain_batch=8) for m in ("random", "all_mlps")}
    options = RunOptions(relearn=False, probes=False)
    with pytest.warns(UnknownFactsWarning):
        results = compare_localizations(model, tok, task, list(configs), configs, options, out_dir=tmp_path,
                                        progress=False, show_table=True, allow_unknown_facts=True, seeds=(0, 1, 2))
    assert results["seeds"] == [0, 1, 2]
    for method in configs:
        runs = [results["methods"][method]["runs"][str(s)] for s in (0, 1, 2)]
        assert [r["seed"] for r in runs] == [0, 1, 2]
        stored = {r["config"]["seed"]: r["metrics"] for r in _store(tmp_path) if r["config"]["method"] == method}
        assert stored == {s: r["summary"] for s, r in zip((0, 1, 2), runs)}
        assert [r["edit"]["config"]["seed"] for r in runs] == [0, 1, 2]  # batch order drawn per seed
        agg = results["methods"][method]
        values = [r["summary"]["maintain_acc"] for r in runs]
        assert agg["summary"]["maintain_acc"] == pytest.approx(statistics.fmean(values))
        if len(set(values)) > 1:
            assert agg["std"]["maintain_acc"] == pytest.approx(statistics.stdev(values))
        assert agg["selections"] == {str(s): r["localization"]["components"] for s, r in zip((0, 1, 2), runs)}
    printed = capsys.readouterr().out
    assert "mean±std over 3 seeds" in printed and "selections over 3 seeds" in printed
    assert "all_mlps: the same on every seed" in printed
    # mu-fast report on the comparison's store: the same spread and the paired intervals, from the records alone
    from mu_fast.sweep.report import write_report

    text = write_report(tmp_path / "runs.jsonl", tmp_path / "report")["text"]
    assert "selections over 3 seeds" in text and "all_mlps: the same on every seed" in text
    assert "paired with random on the same seeds" in text
    with pytest.raises(ValueError, match="seeds must be distinct"):
        compare_localizations(model, tok, task, ["random"], configs, options, progress=False, seeds=(1, 1))


def test_worker_processes_give_the_same_numbers(setup, tmp_path):
    """workers=2 runs each (method, seed) in a spawned process: every number equals the in-process run's."""
    model, tok, task = setup
    configs = {m: EditConfig(steps=2, lr=1e-2, lm_batch=4, maintain_batch=8) for m in ("random", "atp")}
    options = RunOptions(relearn=True, relearn_steps=2, relearn_rank=4, probes=False)
    kwargs = dict(progress=False, allow_unknown_facts=True, seeds=(0, 1))
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: float sums over other thread splits round differently
    try:
        with pytest.warns(UnknownFactsWarning):
            here = compare_localizations(model, tok, task, list(configs), configs, options, **kwargs)
    finally:
        torch.set_num_threads(threads)
    with pytest.warns(UnknownFactsWarning):
        there = compare_localizations(model, tok, task, list(configs), configs, options, out_dir=tmp_path, workers=2,
                                      **kwargs)
    for method in configs:
        for seed in ("0", "1"):
            a, b = here["methods"][method]["runs"][seed], there["methods"][method]["runs"][seed]
            assert a["localization"]["components"] == b["localization"]["components"]
            assert {k: v for k, v in a["summary"].items() if k != "seconds"} == \
                   {k: v for k, v in b["summary"].items() if k != "seconds"}, (method, seed)
    assert {(r["config"]["method"], r["config"]["seed"]) for r in _store(tmp_path)} == \
        {(m, s) for m in configs for s in (0, 1)}
