"""The sequential CounterFact experiment under ``--preset paper``: every method the authors ran sequentially (their
``results_rebuttal_counterfact/*_sequential``), each partition's own localization shown in the dry run (never the
0_64 selection, which the experiment does not edit), the baselines drawn per partition as their script, and the
flags that change the authors' evaluation settings named correctly."""

from __future__ import annotations

import re

import pytest
import torch

from mu_fast.paper_protocol import BASELINES, CF_PARTITIONS, METHODS, paper_protocol
from tests.test_cli import no_loading, run_main  # noqa: F401 (fixture)


def meta_model(key: str):
    from transformers import AutoModelForCausalLM

    from mu_fast.data.datadir import paper_model
    from mu_fast.models.shipped import shipped_config

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(shipped_config(paper_model(key).shapes))


def layers_of(mask) -> dict[str, set[int]]:
    out = {"attn": set(), "mlp": set()}
    for name in mask:
        layer = int(re.search(r"layers\.(\d+)\.", name)[1])
        out["mlp" if ".mlp." in name else "attn"].add(layer)
    return out


def test_sequential_baselines_follow_each_partition(data_dir):
    """random: whole matrices up to the partition's budget (the authors' len(FLU layers) x MLP size); random_mlps: as
    many MLP layers as the partition's FLU layers; both drawn anew per partition; all_mlps / nonlocalized fixed."""
    from mu_fast.localize.paper_graphs import paper_flu_layers, paper_localization_budget
    from mu_fast.models.sites import Component, SiteTable
    from mu_fast.paper_protocol import paper_sequential_masks

    model = meta_model("gemma-2-9b")
    table = SiteTable(model)
    biggest = max(table.component_size(Component(k, 0)) for k in ("attn", "mlp"))
    masks = {m: paper_sequential_masks(model, m, model_key="gemma-2-9b", seed=3) for m in BASELINES}
    for p, r in enumerate(CF_PARTITIONS):
        budget = paper_localization_budget("gemma-2-9b", "counterfact", r)
        assert budget <= masks["random"][p].param_count() < budget + biggest
        assert all(s.kind == "whole" for s in masks["random"][p].values())
        mlps = layers_of(masks["random_mlps"][p])
        assert not mlps["attn"] and len(mlps["mlp"]) == len(paper_flu_layers("gemma-2-9b", "counterfact", r))
    assert len({frozenset(m) for m in masks["random_mlps"]}) == 4 and len({frozenset(m) for m in masks["random"]}) == 4
    assert layers_of(masks["all_mlps"][0]) == {"attn": set(), "mlp": set(range(table.n_layers))}
    assert layers_of(masks["nonlocalized"][0]) == {"attn": set(range(table.n_layers)), "mlp": set(range(table.n_layers))}
    assert all(m == masks["nonlocalized"][0] for m in masks["nonlocalized"])
    assert paper_sequential_masks(model, "random", model_key="gemma-2-9b", seed=3) == masks["random"]  # seeded
    with pytest.raises(ValueError, match="sequential experiment's methods"):
        paper_sequential_masks(model, "paper:random", model_key="gemma-2-9b")


def test_sequential_protocol_edits_only_the_partitions(data_dir):
    protocol = paper_protocol("gemma-7b", "counterfact", "forget_64_sequential")
    assert set(protocol["methods"]) == set(METHODS)
    assert all(m["localization"] is None for m in protocol["methods"].values())  # the 0_64 selection is not edited
    assert protocol["flu_layers"] is None and protocol["budget"] is None
    assert protocol["evaluations"]["relearn"] and "softprompt" in protocol["evaluations"]


@pytest.mark.parametrize("model", ["gemma-2-9b", "gemma-7b"])
def test_sequential_dry_run_shows_each_partitions_selection(model, data_dir, tmp_path, capsys, no_loading):
    hub = {"gemma-2-9b": "google/gemma-2-9b", "gemma-7b": "google/gemma-7b"}[model]
    code, stdout, err = run_main(["run", hub, "--preset", "paper", "--dataset", "counterfact", "--experiment",
                                  "forget_64_sequential", "--dry-run", "--out", str(tmp_path / "out")], capsys)
    assert code == 0, err
    protocol = paper_protocol(model, "counterfact", "forget_64_sequential")
    blocks = re.split(r"^partition ", stdout, flags=re.M)[1:]
    assert [b.split(":", 1)[0] for b in blocks] == list(CF_PARTITIONS)
    shown = set()
    for block, part in zip(blocks, protocol["partitions"], strict=True):
        for method, loc in part["localizations"].items():
            line = f"  {method:14s} attn {loc['attn']} mlp {loc['mlp']} ({loc['params']:,} params)"
            assert line in block, (part["range"], method)
            shown.add(line.split(maxsplit=1)[1])
        assert f"  random_mlps    {len(part['flu_layers'])} random MLP layers" in block
        assert f"  random         random matrices, budget {part['budget']:,} params" in block
    # the 0_64 selections (the forget_64 experiment's) appear only where a partition has the same one
    whole = paper_protocol(model, "counterfact", "forget_64")
    for method, entry in whole["methods"].items():
        loc = entry["localization"]
        if loc is not None:
            text = f"attn {loc['attn']} mlp {loc['mlp']} ({loc['params']:,} params)"
            assert (text in stdout) == (text in shown), method
    assert "evaluations after the last partition, on all 64 facts: formats all, relearn, softprompt, capability" in stdout


def dry_lines(capsys, tmp_path, *extra, dataset="counterfact", experiment="forget_64_sequential", model="google/gemma-7b"):
    code, stdout, err = run_main(["run", model, "--preset", "paper", "--dataset", dataset, "--experiment", experiment,
                                  "--dry-run", "--out", str(tmp_path / "out"), *extra], capsys)
    return code, [line for line in stdout.splitlines() if line.startswith(("warning:", "note:"))], err


@pytest.mark.parametrize("experiment", ["forget_16", "forget_64_sequential"])
def test_relearn_flags_name_the_authors_settings(experiment, data_dir, tmp_path, capsys, no_loading):
    code, lines, err = dry_lines(capsys, tmp_path, "--relearn-cf-target-false-bug", experiment=experiment)
    assert code == 0, err
    assert len(lines) == 1 and lines[0].startswith("note: --relearn-cf-target-false-bug is the authors' setting")
    assert "not the authors' setting" not in lines[0]
    code, lines, err = dry_lines(capsys, tmp_path, "--no-relearn-score-in-train-mode", "--relearn-lora-rank", "512",
                                 experiment=experiment)
    assert code == 0, err  # the preset's own value (rank 512) says nothing; dropout-off scoring is not theirs
    assert lines == ["warning: --no-relearn-score-in-train-mode replaces the authors' relearning score_in_train_mode "
                     "(True) (not the authors' setting)"]


def test_relearn_bug_flag_on_sports_is_one_line(data_dir, tmp_path, capsys, no_loading):
    code, _, err = dry_lines(capsys, tmp_path, "--relearn-cf-target-false-bug", dataset="sports", experiment="forget_16")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--dataset sports has none" in err, err


@pytest.mark.parametrize("model, flag, warns", [("google/gemma-7b", "--mmlu-add-bos", False),
                                                ("google/gemma-7b", "--no-mmlu-add-bos", True),
                                                ("meta-llama/Meta-Llama-3-8B", "--no-mmlu-add-bos", False),
                                                ("meta-llama/Meta-Llama-3-8B", "--mmlu-add-bos", True)])
def test_mmlu_add_bos_flag(model, flag, warns, data_dir, tmp_path, capsys, no_loading):
    code, lines, err = dry_lines(capsys, tmp_path, flag, dataset="sports", experiment="forget_16", model=model)
    assert code == 0, err
    assert [line.startswith(f"warning: {flag}: lm-eval requests") for line in lines] == ([True] if warns else [])


def test_mmlu_add_bos_flag_errors(data_dir, tmp_path, capsys, no_loading):
    code, _, err = dry_lines(capsys, tmp_path, "--mmlu-add-bos", "--paper-evals", "softprompt")
    assert code == 2 and "does not run the capability evaluation" in err and len(err.strip().splitlines()) == 1, err
    code, _, err = run_main(["run", "organism:ci", "--no-mmlu-add-bos"], capsys)
    assert code == 2 and "options of --preset paper" in err and len(err.strip().splitlines()) == 1, err


def test_spec_capability_add_bos_is_checked():
    from mu_fast.sweep.evaluations import resolve_evaluations

    assert resolve_evaluations({"capability": {"add_bos": "paper"}})["extra"]["capability"]["add_bos"] == "paper"
    assert resolve_evaluations({"capability": True})["extra"]["capability"]["add_bos"] is None
    with pytest.raises(ValueError, match="add_bos must be null, true, false or 'paper'"):
        resolve_evaluations({"capability": {"add_bos": "yes"}})
    assert resolve_evaluations({"relearn": {"score_in_train_mode": True}})["relearn"]["score_in_train_mode"] is True


def _doc() -> str:
    from pathlib import Path

    return (Path(__file__).resolve().parents[1] / "docs" / "protocol_differences.md").read_text()


def test_doc_random_mlps_entry_is_what_the_sweep_does():
    """The page once said a sweep's random_mlps took mu_fast's FLU count on the paper's models; the sweep takes the
    authors' FLU list there (tests/test_cli_paper.py::test_random_mlps_takes_the_paper_flu_layer_count)."""
    entry = next(b for b in _doc().split("\n* ") if b.startswith("**`random_mlps`"))
    assert "as many MLP layers as the authors' FLU list" in entry and "mu_fast's FLU on the loaded model" not in \
        entry.split("On other models")[0]


def test_doc_names_only_existing_run_flags_and_options():
    import inspect

    import typer

    from mu_fast.cli import app
    from mu_fast.evaluate.capability import capability_eval
    from mu_fast.evaluate.relearn import relearn_attack
    from mu_fast.localize.corrupt import NOISE_RULES

    text = _doc()
    run = typer.main.get_command(app).commands["run"]
    options = {o for p in run.params for o in (*p.opts, *p.secondary_opts)}
    named = set(re.findall(r"`(--[a-z0-9-]+)", text)) | set(re.findall(r"/(--[a-z0-9-]+)`", text))
    assert named and named <= options, named - options
    assert {"score_in_train_mode", "cf_target_false_bug"} <= set(inspect.signature(relearn_attack).parameters)
    assert "add_bos" in inspect.signature(capability_eval).parameters
    assert set(re.findall(r'`noise="(\w+)"`', text)) <= set(NOISE_RULES)
