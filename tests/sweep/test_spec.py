"""Sweep specs: expansion, run ids (stable, distinct, independent of key order and of the process), presets,
and one-line errors for bad specs, all without loading a model."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mu_fast.sweep.spec import RunConfig, expand, load_spec

REPO = Path(__file__).resolve().parents[2]


def small_spec(**overrides):
    spec = {
        "name": "t",
        "models": ["organism:ci"],
        "tasks": [{"dataset": "organism", "forget_splits": ["first_16_unsplit", "first_64_unsplit"]}],
        "methods": ["flu", "atp", "all_mlps"],
        "edit": {"preset": "organism", "steps": 5, "lr": [1e-3, 3e-3]},
        "seeds": [0, 1],
        "evaluations": {"formats": ["normal"], "relearn": {"steps": 2}},
    }
    spec.update(overrides)
    return spec


def test_expansion_counts_and_resolution():
    runs = expand(small_spec())
    assert len(runs) == 2 * 3 * 2 * 2  # tasks x methods x lrs x seeds
    assert len({r.run_id for r in runs}) == len(runs)
    flu = next(r for r in runs if r.method == "flu")
    # preset (organism, lookup group) < edit fields < grid point; the seed is the run's
    assert flu.edit["maintain_coef"] == 5.0 and flu.edit["steps"] == 5 and flu.edit["seed"] == flu.seed
    assert flu.group == "lookup" and set(flu.axes) == {"lr"}
    assert flu.evaluations["relearn"]["steps"] == 2 and flu.evaluations["relearn"]["lora_rank"] == 512
    assert flu.model["organism_hash"] and flu.model["dtype"] == "fp32"


def test_group_overrides_and_budget_axis():
    spec = small_spec(methods=["flu", "random", "nonlocalized"], budget=[1000, 2000],
                      edit={"lr": [1e-3, 3e-3], "groups": {"broad": {"lr": 1e-4, "forget_coef": [1, 2]}}})
    runs = expand(spec)
    broad = [r for r in runs if r.method == "nonlocalized"]
    assert {r.edit["lr"] for r in broad} == {1e-4} and {r.edit["forget_coef"] for r in broad} == {1.0, 2.0}
    # budget is an axis only for the methods that take one; the others are not repeated per budget
    assert {r.budget for r in runs if r.method == "random"} == {1000, 2000}
    assert {r.budget for r in runs if r.method == "flu"} == {None}
    assert len([r for r in runs if r.method == "flu"]) == 2 * 2 * 2  # tasks x lrs x seeds, not x budgets


def test_method_overrides_come_last_and_name_a_listed_method():
    spec = small_spec(methods=["flu", "random_mlps", "atp"],
                      edit={"lr": 1e-3, "groups": {"lookup": {"lr": 2e-3}}, "methods": {"flu": {"lr": [5e-3, 1e-2]}}})
    runs = expand(spec)
    lrs = {m: sorted({r.edit["lr"] for r in runs if r.method == m}) for m in ("flu", "random_mlps", "atp")}
    # flu: its own values beat its group's; random_mlps (same group) keeps the group's; atp the spec-wide one
    assert lrs == {"flu": [5e-3, 1e-2], "random_mlps": [2e-3], "atp": [1e-3]}
    assert {tuple(r.axes) for r in runs if r.method == "flu"} == {("lr",)}
    with pytest.raises(ValueError, match="edit.methods.*'ct'.*not among methods"):
        expand(small_spec(edit={"methods": {"ct": {"lr": 1e-3}}}))


def test_run_ids_ignore_key_order_and_number_spelling():
    spec = small_spec()
    reordered = json.loads(json.dumps(dict(reversed(list(spec.items())))))
    reordered["edit"] = dict(reversed(list(reordered["edit"].items())))
    reordered["evaluations"] = {"relearn": {"steps": 2}, "formats": ["normal"]}
    assert [r.run_id for r in expand(spec)] == [r.run_id for r in expand(reordered)]
    spelled = small_spec(edit={"preset": "organism", "steps": 5, "lr": ["1e-3", 0.003]})  # YAML reads 1e-3 as text
    assert {r.run_id for r in expand(spelled)} == {r.run_id for r in expand(spec)}
    one = small_spec(edit={"preset": "organism", "steps": 5, "lr": 1})
    ints = small_spec(edit={"preset": "organism", "steps": 5, "lr": 1.0})
    assert [r.run_id for r in expand(one)] == [r.run_id for r in expand(ints)]


def test_run_ids_are_stable_across_processes():
    spec = small_spec()
    code = ("import json,sys; from mu_fast.sweep.spec import expand; "
            "print(json.dumps([r.run_id for r in expand(json.loads(sys.argv[1]))]))")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "12345", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [r.run_id for r in expand(spec)]


def test_every_setting_changes_the_id():
    base = expand(small_spec())[0]
    changed = [
        RunConfig(base.model, base.task, base.method, base.budget, base.seed + 1, base.edit, base.evaluations, base.group),
        RunConfig(base.model, {**base.task, "inject_label": "golf"}, base.method, base.budget, base.seed, base.edit,
                  base.evaluations, base.group),
        RunConfig(base.model, base.task, base.method, base.budget, base.seed, {**base.edit, "lm_coef": 0.5},
                  base.evaluations, base.group),
        RunConfig(base.model, base.task, base.method, base.budget, base.seed, base.edit,
                  {**base.evaluations, "batch_size": 32}, base.group),
        RunConfig({**base.model, "organism_hash": "0" * 16}, base.task, base.method, base.budget, base.seed, base.edit,
                  base.evaluations, base.group),
    ]
    assert len({base.run_id, *(c.run_id for c in changed)}) == 1 + len(changed)
    # the axes label is for reports only
    assert RunConfig(**{**base.__dict__, "axes": {"x": 1}}).run_id == base.run_id


def test_round_trip_and_yaml_vars(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("vars: {m: 'organism:ci', lr: 3.0e-3}\nmodels: ['${m}']\n"
                    "tasks: [{dataset: organism}]\nmethods: [flu]\nedit: {lr: '${lr}', steps: 3, lm_coef: 0}\n")
    runs = expand(path)
    assert len(runs) == 1 and runs[0].edit["lr"] == 3e-3 and runs[0].model["ref"] == "organism:ci"
    assert RunConfig.from_dict(json.loads(json.dumps(runs[0].to_dict()))).run_id == runs[0].run_id
    assert expand(path, vars={"lr": 1e-3})[0].edit["lr"] == 1e-3


@pytest.mark.parametrize("change, message", [
    ({"metods": ["flu"]}, "unknown key 'metods' (did you mean 'methods'?)"),
    ({"methods": ["flux"]}, "unknown method 'flux' (did you mean 'flu'?)"),
    ({"methods": []}, "methods: give a non-empty list"),
    ({"methods": ["paper:flu"]}, "paper:flu needs a paper model"),
    ({"methods": ["paper:xyz"]}, "the paper's selections are paper:ap"),
    ({"tasks": [{"dataset": "sport"}]}, "unknown dataset 'sport'"),
    ({"tasks": [{"dataset": "organism", "forget_splits": ["first_17_unsplit"]}]}, "forget_splits"),
    ({"tasks": [{"dataset": "organism", "inject_labels": ["tennis"]}]}, "inject_labels: 'tennis'"),
    ({"tasks": [{"dataset": "sports", "lm_texts": None}]}, "organism:ci knows only its own facts"),
    ({"edit": {"lr": []}}, "edit.lr: an empty list gives an empty grid"),
    ({"edit": {"learning_rate": 1e-3}}, "unknown EditConfig field 'learning_rate'"),
    ({"edit": {"lr": "fast"}}, "edit.lr: lr must be a number"),
    ({"edit": {"seed": 3}}, "seeds:"),
    ({"edit": {"lr": -1.0}}, "lr must be positive"),
    ({"edit": {"preset": "organsim"}}, "unknown preset 'organsim' (did you mean 'organism'?)"),
    ({"edit": {"groups": {"lookups": {"lr": 1.0}}}}, "unknown method group 'lookups'"),
    ({"seeds": []}, "seeds: give a non-empty list"),
    ({"budget": -5}, "budget: -5"),
    ({"models": ["organism:big"]}, "unknown organism preset 'big'"),
    ({"models": ["/no/such/folder"]}, "no checkpoint folder"),
    ({"models": [{"name": "random:gemma-2-9b"}]}, "add tokenizer:"),
    ({"evaluations": {"relearn": {"rank": 8}}}, "unknown setting 'rank'"),
    ({"evaluations": {"prob": True}}, "unknown key 'prob' (did you mean 'probes'?)"),
    ({"models": ["${nope}"]}, "${nope} is not defined"),
])
def test_spec_errors_are_one_line_and_name_the_key(change, message):
    with pytest.raises(ValueError) as err:
        expand(small_spec(**change))
    text = str(err.value)
    assert message in text and "\n" not in text and text.startswith("spec:")


def test_sports_needs_lm_texts_or_lm_coef_zero(tmp_path):
    spec = small_spec(models=["random:gemma-2-9b"], tasks=[{"dataset": "sports"}])
    spec["models"] = [{"name": "random:gemma-2-9b", "tokenizer": str(tmp_path)}]
    with pytest.raises(ValueError, match="add lm_texts: <text file or pile> to the task, or set edit: {lm_coef: 0}"):
        expand(spec)
    spec["edit"] = {"lm_coef": 0}
    assert len(expand(spec)) == 3 * 2


def test_shipped_specs_expand():
    ci = expand(REPO / "specs" / "ci_organism.yaml")
    assert len(ci) >= 12 and len({r.method for r in ci}) >= 3
    paper = expand(REPO / "specs" / "paper_table1_sports.yaml", vars={"model": "google/gemma-2-9b"})
    assert len(paper) == 9 * 3
    groups = {r.method: (r.edit["lr"], r.edit["forget_coef"]) for r in paper}
    # §3.4, gemma2 forget_{sport}_inject_golf: (FLU, *-MLPs) 5e-5/5, (AP, CT, random) 5e-5/5, (all-MLPs, nonloc.) 1e-5/5
    assert groups["flu"] == groups["ct_mlps"] == (5e-5, 5.0) and groups["nonlocalized"] == (1e-5, 5.0)
    assert all(r.task["inject_label"] == "None" and r.edit["state_bits"] == 8 for r in paper)
    llama = expand(REPO / "specs" / "paper_table1_sports.yaml",
                   vars={"model": "meta-llama/Meta-Llama-3-8B", "paper_model": "llama-3-8b", "experiment": "forget_16"})
    by_method = {r.method: (r.edit["lr"], r.edit["forget_coef"]) for r in llama}
    assert by_method["flu"] == (5e-5, 5.0) and by_method["atp"] == (1e-4, 2.0) and by_method["all_mlps"] == (2e-5, 2.0)


def test_relearn_defaults_match_relearn_attack():
    from mu_fast.evaluate.relearn import relearn_attack
    from mu_fast.sweep.evaluations import PROBE_DEFAULTS, RELEARN_DEFAULTS

    params = inspect.signature(relearn_attack).parameters
    assert {k: params[k].default for k in RELEARN_DEFAULTS} == RELEARN_DEFAULTS
    from mu_fast.evaluate.probes import latent_probes

    params = inspect.signature(latent_probes).parameters
    assert {k: params[k].default for k in PROBE_DEFAULTS} == PROBE_DEFAULTS


def test_load_spec_from_yaml_text_and_bad_yaml():
    assert load_spec("models: [organism]\ntasks: [{dataset: organism}]\nmethods: [flu]\n")["models"] == ["organism"]
    with pytest.raises(ValueError, match="spec: not valid YAML"):
        load_spec("models: [organism\n")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_spec("missing_spec.yaml")
