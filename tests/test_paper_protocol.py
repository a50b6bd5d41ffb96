"""paper_protocol reproduces the authors' settings: lr / forget coefficient / steps / 8-bit per method from the §3.4
table of reference/authors_repo.md (parsed from the file), localizations rebuilt independently from the committed
graphs and manual-layers files, and a sweep spec that expands to those runs with the authors' evaluations."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from mu_fast.paper_protocol import CF_PARTITIONS, METHODS, paper_protocol

MODELS = {"gemma": "gemma-7b", "gemma2": "gemma-2-9b", "llama3": "llama-3-8b"}
COLUMNS = {"FLU(manual_interp)": "paper:flu", "CT": "paper:ct", "AP": "paper:ap", "random": "random",
           "CT-MLPs": "paper:ct_mlps", "AP-MLPs": "paper:ap_mlps", "random-MLPs": "random_mlps",
           "all-MLPs": "all_mlps", "nonlocalized": "nonlocalized"}


def authors_table() -> list[dict]:
    """The rows of authors_repo.md §3.4: {dataset, model, experiment, steps, bits8, cells: {method: (lr, coef)}}."""
    path = Path(os.environ.get("MU_FAST_DATA_DIR", "../shared/data")).parent / "reference" / "authors_repo.md"
    if not path.is_file():
        pytest.skip(f"{path} not present (the shared reference folder)")
    text = path.read_text().split("### 3.4", 1)[1].split("###", 1)[0]
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = []
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        name = cells[0]
        cf = name.startswith("CF:")
        m = re.fullmatch(r"(gemma2|gemma|llama3)_forget_(16|64|\{baseball,basketball,football\})_inject(_sequential|_golf|_random_without_golf)?",
                         name.removeprefix("CF:"))
        assert m, name
        experiment = "sport_golf" if m[2].startswith("{") else f"forget_{m[2]}" + ("_sequential" if m[3] == "_sequential" else "")
        methods = {COLUMNS[h]: (float(c.split("/")[0]), float(c.split("/")[1])) for h, c in zip(header, cells) if h in COLUMNS}
        rows.append({"dataset": "counterfact" if cf else "sports", "model": MODELS[m[1]], "experiment": experiment,
                     "steps": int(cells[1]), "bits8": cells[2] == "Y", "methods": methods})
    assert len(rows) == 18
    return rows


def test_edit_settings_match_section_3_4(data_dir):
    for row in authors_table():
        protocol = paper_protocol(row["model"], row["dataset"], row["experiment"])
        assert set(protocol["methods"]) == set(row["methods"]) == set(METHODS)
        for method, (lr, coef) in row["methods"].items():
            edit = protocol["methods"][method]["edit"]
            assert (edit["lr"], edit["forget_coef"], edit["steps"]) == (lr, coef, row["steps"]), (row, method)
            assert (edit.get("state_bits") == 8) == row["bits8"]


def independent_selection(data_dir, model, dataset, method, forget_range):
    """The authors' rule (authors_repo.md §2): layer scores from the raw graph, |score| ranking, threshold where the
    budget (FLU layers x MLP size) runs out, keep every component at or above it."""
    from mu_fast.localize.paper_graphs import _SPORTS_GRAPHS, paper_site_table
    from mu_fast.data.datadir import paper_model
    from mu_fast.models.sites import Component

    base = method.split("_")[0]
    stem = (_SPORTS_GRAPHS[(model, base)] if dataset == "sports"
            else f"{paper_model(model).file_prefix}_counterfact_{base}_graph_{forget_range}")
    graph = json.loads((data_dir / "localization_graphs" / f"{stem}.json").read_text())
    scores: dict[tuple[str, int], float] = {}
    for key, value in graph.items():
        kind = "attn" if key.startswith("a") else "mlp"
        layer = int(re.match(r"[am](\d+)", key)[1])
        scores[(kind, layer)] = scores.get((kind, layer), 0.0) + value
    if method.endswith("_mlps"):
        scores = {k: v for k, v in scores.items() if k[0] == "mlp"}
    table = paper_site_table(model)
    size = {k: table.component_size(Component(*k)) for k in scores}
    budget = len(flu_from_data(data_dir, model, dataset, forget_range)) * table.component_size(Component("mlp", 0))
    threshold = None
    for k in sorted(scores, key=lambda k: -abs(scores[k])):
        budget -= size[k]
        if budget <= 0:
            threshold = abs(scores[k])
            break
    keep = [k for k in scores if threshold is None or abs(scores[k]) >= threshold]
    return sorted(layer for kind, layer in keep if kind == "attn"), sorted(layer for kind, layer in keep if kind == "mlp")


def flu_from_data(data_dir, model, dataset, forget_range):
    if dataset == "sports":  # authors_repo.md §2.1: fixed in the scripts; the reference text states them
        return {"gemma-7b": range(2, 8), "gemma-2-9b": range(2, 7), "llama-3-8b": range(1, 5)}[model]
    from mu_fast.data.datadir import paper_model

    name = f"{paper_model(model).file_prefix}_manual_layers_{forget_range}.json"
    return sorted(json.loads((data_dir / "counterfact_manual_results" / name).read_text())["chosen_layers"])


@pytest.mark.parametrize("model", list(MODELS.values()))
@pytest.mark.parametrize("dataset, experiment, forget_range",
                         [("sports", "forget_16", "0_16"), ("counterfact", "forget_16", "0_16"), ("counterfact", "forget_64", "0_64")])
def test_localizations_are_the_graphs_selections(data_dir, model, dataset, experiment, forget_range):
    protocol = paper_protocol(model, dataset, experiment)
    flu = list(flu_from_data(data_dir, model, dataset, forget_range))
    assert protocol["flu_layers"] == flu and protocol["methods"]["paper:flu"]["localization"]["mlp"] == flu
    for method in ("ap", "ct", "ap_mlps", "ct_mlps"):
        loc = protocol["methods"][f"paper:{method}"]["localization"]
        assert (loc["attn"], loc["mlp"]) == independent_selection(data_dir, model, dataset, method, forget_range), method
        assert loc["params"] >= protocol["budget"]


def test_sequential_counterfact_has_one_localization_per_partition(data_dir):
    protocol = paper_protocol("gemma-2-9b", "counterfact", "forget_64_sequential")
    assert protocol["spec"] is None and "sequential_edit" in protocol["spec_note"]
    assert [p["range"] for p in protocol["partitions"]] == list(CF_PARTITIONS)
    for part in protocol["partitions"]:
        assert part["flu_layers"] == flu_from_data(data_dir, "gemma-2-9b", "counterfact", part["range"])
        loc = part["localizations"]["paper:ap"]
        assert (loc["attn"], loc["mlp"]) == independent_selection(data_dir, "gemma-2-9b", "counterfact", "ap", part["range"])
    assert protocol["methods"]["paper:flu"]["edit"]["steps"] == 25


@pytest.mark.parametrize("dataset, experiment, probes", [("sports", "forget_64", True), ("sports", "sport_golf", False),
                                                         ("counterfact", "forget_16", False)])
def test_spec_expands_to_the_authors_runs(data_dir, dataset, experiment, probes):
    import mu_fast.sweep as sweep
    from mu_fast.sweep.evaluations import RELEARN_DEFAULTS

    protocol = paper_protocol("meta-llama/Meta-Llama-3-8B", dataset, experiment)
    runs = sweep.expand(protocol["spec"])
    n_tasks = 3 if experiment == "sport_golf" else 1
    assert len(runs) == len(METHODS) * n_tasks and {r.method for r in runs} == set(METHODS)
    for run in runs:
        want = protocol["methods"][run.method]["edit"]
        assert (run.edit["lr"], run.edit["forget_coef"], run.edit["steps"]) == (want["lr"], want["forget_coef"], want["steps"])
        assert run.model["paper_model"] == "llama-3-8b"
        ev = run.evaluations
        # relearning as the authors scored it (LoRA dropout live), CounterFact toward the true answer (not their bug)
        assert ev["formats"] is None and ev["relearn"] == {**RELEARN_DEFAULTS, "score_in_train_mode": True}
        assert ev["extra"]["softprompt"]["steps"] is None and ev["extra"]["softprompt"]["autocast"] == "paper"
        assert ev["extra"]["capability"]["tasks"] == ["mmlu", "sciq"]
        assert ev["extra"]["capability"]["add_bos"] == "paper"  # lm-eval 0.4.4's encoding
        assert ("paper_probes" in ev["extra"]) == probes and ev["probes"] is None
    labels = {r.task["inject_label"] for r in runs}
    assert labels == {"golf" if experiment == "sport_golf" else "target_false" if dataset == "counterfact" else "random_without_golf"}
    assert {r.budget for r in runs if r.method == "random"} == {protocol["budget"]}


def test_spec_options_reach_the_runs(data_dir, tmp_path):
    import mu_fast.sweep as sweep

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma"}))  # a local checkpoint folder
    texts = tmp_path / "texts.txt"
    texts.write_text("Some text.\nMore text.\n")
    spec = paper_protocol("gemma-7b", "counterfact", "forget_64", model_ref=str(tmp_path), lm_texts=str(texts),
                          seeds=[3, 4])["spec"]
    assert spec["models"][0]["name"] == str(tmp_path) and spec["models"][0]["paper_model"] == "gemma-7b"
    runs = sweep.expand(spec)
    assert {r.seed for r in runs} == {3, 4} and len(runs) == 2 * len(METHODS)
    assert {r.model["ref"] for r in runs} == {str(tmp_path)} and {r.task["lm_texts"] for r in runs} == {str(texts)}
    assert {r.task["forget_split"] for r in runs} == {"first_64_unsplit"} and {r.task["cf_model"] for r in runs} == {"gemma-7b"}


def test_bad_arguments_name_the_choices():
    with pytest.raises(ValueError, match="'sports' and 'counterfact'"):
        paper_protocol("gemma-7b", "wikipedia", "forget_16")
    with pytest.raises(ValueError, match="experiments are"):
        paper_protocol("gemma-7b", "counterfact", "sport_golf")
    with pytest.raises(ValueError, match="unknown paper model"):
        paper_protocol("gpt-2", "sports", "forget_16")


def test_sequential_masks_follow_each_partition(data_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from mu_fast.data.datadir import paper_model
    from mu_fast.models.shipped import shipped_config
    from mu_fast.models.sites import Component, SiteTable
    from mu_fast.paper_protocol import paper_sequential_masks

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(shipped_config(paper_model("gemma-2-9b").shapes))
    masks = paper_sequential_masks(model, "paper:flu", model_key="gemma-2-9b")
    table = SiteTable(model)
    for mask, r in zip(masks, CF_PARTITIONS, strict=True):
        layers = flu_from_data(data_dir, "gemma-2-9b", "counterfact", r)
        assert mask.param_count() == len(layers) * table.component_size(Component("mlp", 0))
        assert {int(re.search(r"layers\.(\d+)\.", n)[1]) for n in mask} == set(layers)

