"""Spec checks that come before any model loads: every numeric evaluation / relearn / probe setting in range, edit
fields in range, formats that exist for the task, variables that are used, and duplicates refused alike."""

from __future__ import annotations

import pytest
import yaml

from mu_fast.sweep.spec import expand
from tests.test_cli import no_loading, run_main  # noqa: F401 (fixture)


def spec(**overrides):
    data = {"name": "checks", "vars": {"model": "organism:ci"}, "models": ["${model}"],
            "tasks": [{"dataset": "organism"}], "methods": ["flu", "atp"],
            "edit": {"preset": "organism", "steps": 2, "lr": [1e-3, 3e-3]}, "seeds": [0, 1],
            "evaluations": {"formats": ["normal", "mcq"], "relearn": {"steps": 2}, "probes": {"steps": 10}}}
    data.update(overrides)
    return data


BAD_EVALUATIONS = {
    "probes steps -1": ({"probes": {"steps": -1}}, "evaluations.probes.steps must be a positive integer; got -1"),
    "probes steps 0": ({"probes": {"steps": 0}}, "evaluations.probes.steps must be a positive integer"),
    "probes test_fraction 1.5": ({"probes": {"test_fraction": 1.5}}, "evaluations.probes.test_fraction must be a "
                                                                      "number in (0, 1); got 1.5"),
    "probes test_fraction 0": ({"probes": {"test_fraction": 0}}, "evaluations.probes.test_fraction"),
    "probes seed -3": ({"probes": {"seed": -3}}, "evaluations.probes.seed must be an integer >= 0"),
    "probes weight_decay -1": ({"probes": {"weight_decay": -1.0}}, "evaluations.probes.weight_decay"),
    "probes weight_decay text": ({"probes": {"weight_decay": "heavy"}}, "evaluations.probes.weight_decay"),
    "probes position": ({"probes": {"position": "first"}}, "evaluations.probes.position"),
    "relearn steps -1": ({"relearn": {"steps": -1}}, "evaluations.relearn.steps must be an integer >= 0"),
    "relearn lr 0": ({"relearn": {"lr": 0}}, "evaluations.relearn.lr must be a positive number"),
    "relearn lr nan": ({"relearn": {"lr": float("nan")}}, "evaluations.relearn.lr must be a positive number"),
    "relearn lora_rank 0": ({"relearn": {"lora_rank": 0}}, "evaluations.relearn.lora_rank"),
    "relearn lora_alpha -1": ({"relearn": {"lora_alpha": -1}}, "evaluations.relearn.lora_alpha"),
    "relearn lora_dropout 1": ({"relearn": {"lora_dropout": 1}}, "evaluations.relearn.lora_dropout must be a number "
                                                                 "in [0, 1)"),
    "relearn batch_size 0": ({"relearn": {"batch_size": 0}}, "evaluations.relearn.batch_size"),
    "relearn lm_batch_size -2": ({"relearn": {"lm_batch_size": -2}}, "evaluations.relearn.lm_batch_size"),
    "relearn lm_max_tokens 0": ({"relearn": {"lm_max_tokens": 0}}, "evaluations.relearn.lm_max_tokens"),
    "softprompt eval_batch_size 0": ({"softprompt": {"eval_batch_size": 0}}, "evaluations.softprompt.eval_batch_size"),
    "capability num_fewshot -1": ({"capability": {"num_fewshot": -1}}, "evaluations.capability.num_fewshot"),
    "capability batch_size 0": ({"capability": {"batch_size": 0}}, "evaluations.capability.batch_size"),
    "paper_probes batch_size 0": ({"paper_probes": {"batch_size": 0}}, "evaluations.paper_probes.batch_size"),
}


@pytest.mark.parametrize("case", list(BAD_EVALUATIONS))
def test_numeric_evaluation_settings_are_checked_at_load(case):
    change, message = BAD_EVALUATIONS[case]
    with pytest.raises(ValueError) as err:
        expand(spec(evaluations={"formats": ["normal"], **change}))
    text = str(err.value)
    assert message in text and "\n" not in text and text.startswith("spec: evaluations."), text
    assert "got" in text and ("default" in text)  # what was given and what to use instead


def test_every_numeric_relearn_and_probe_setting_has_a_range():
    from mu_fast.sweep.evaluations import PROBE_DEFAULTS, RELEARN_DEFAULTS, SETTING_RANGES

    for key, defaults in (("relearn", RELEARN_DEFAULTS), ("probes", PROBE_DEFAULTS)):
        numeric = {k for k, v in defaults.items()
                   if not isinstance(v, bool) and (isinstance(v, (int, float)) or v is None)}
        assert numeric <= set(SETTING_RANGES[key]), (key, numeric - set(SETTING_RANGES[key]))


def test_settings_at_the_edges_of_their_ranges_are_accepted():
    runs = expand(spec(evaluations={"relearn": {"steps": 0, "lora_dropout": 0.0},
                                    "probes": {"test_fraction": 0.5, "weight_decay": "1e-3", "seed": 0, "steps": 1}},
                       edit={"steps": 1, "lr": 1e-3, "forget_coef": 0, "betas": [0.0, 0.5]}))
    assert runs[0].evaluations["probes"]["weight_decay"] == 1e-3 and runs[0].evaluations["relearn"]["steps"] == 0


BAD_EDITS = {
    "maintain_batch -32": ({"maintain_batch": -32}, "edit.maintain_batch: maintain_batch must be positive; got -32"),
    "lm_batch 0": ({"lm_batch": 0}, "edit.lm_batch: lm_batch must be positive"),
    "steps 0 in a group": ({"groups": {"broad": {"steps": 0}}}, "edit.groups.broad.steps: steps must be positive"),
    "negative coefficient": ({"maintain_coef": -1}, "edit.maintain_coef: maintain_coef must be >= 0"),
    "grad_clip 0": ({"grad_clip": 0}, "edit.grad_clip: grad_clip must be positive"),
    "infinite lr": ({"lr": float("inf")}, "edit.lr: lr must be a finite number"),
    "betas out of range": ({"betas": [0.9, 1.0]}, "edit.betas: betas must each be in [0, 1)"),
    "micro_batch 0": ({"micro_batch": 0}, "edit.micro_batch: micro_batch must be positive"),
}


@pytest.mark.parametrize("case", list(BAD_EDITS))
def test_edit_fields_are_checked_at_load(case):
    change, message = BAD_EDITS[case]
    with pytest.raises(ValueError) as err:
        expand(spec(edit={"preset": "organism", "steps": 2, **change}))
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_formats_are_checked_against_every_task():
    with pytest.raises(ValueError, match=r"evaluations.formats: 'xyz' is not a format of organism tasks.*normal, qa"):
        expand(spec(evaluations={"formats": ["normal", "mcq", "xyz"]}))
    assert expand(spec(evaluations={"formats": ["normal", "city"]}))  # an organism-only format on organism tasks


def test_cf_formats_are_checked_against_counterfact():
    from mu_fast.sweep.checks import check_formats

    tasks = [{"dataset": "sports"}, {"dataset": "counterfact"}]
    check_formats(["normal", "mcq"], tasks)
    with pytest.raises(ValueError, match="'qa' is not a format of counterfact tasks"):
        check_formats(["normal", "qa"], tasks)  # sports has qa, counterfact does not


DUPLICATES = {
    "seeds": ({"seeds": [0, 1, 0]}, "seeds: 0 is listed twice"),
    "lrs": ({"edit": {"preset": "organism", "lr": [1e-3, 3e-3, 0.001]}}, "edit.lr: 0.001 is listed twice"),
    "lrs in a group": ({"edit": {"groups": {"tracing": {"lr": [1, 1.0]}}}}, "edit.groups.tracing.lr: 1.0 is listed "
                                                                            "twice"),
    "methods": ({"methods": ["flu", "atp", "flu"]}, "methods: 'flu' is listed twice"),
    "budgets": ({"budget": ["paper", None]}, "budget: paper is listed twice"),
    "models": ({"models": ["organism:ci", "${model}"]}, "models: model 'organism:ci' is listed twice"),
    "forget splits": ({"tasks": [{"dataset": "organism", "forget_splits": ["first_16_unsplit", "first_16_unsplit"]}]},
                      "tasks: task organism:first_16_unsplit:random_without_golf is listed twice"),
    "tasks": ({"tasks": [{"dataset": "organism"}, {"dataset": "organism", "forget_split": "first_16_unsplit"}]},
              "tasks: task organism:first_16_unsplit:random_without_golf is listed twice"),
    "formats": ({"evaluations": {"formats": ["normal", "mcq", "mcq"]}}, "evaluations.formats: 'mcq' is listed twice"),
}


@pytest.mark.parametrize("case", list(DUPLICATES))
def test_duplicates_are_errors_alike_naming_the_duplicate(case):
    change, message = DUPLICATES[case]
    with pytest.raises(ValueError) as err:
        expand(spec(**change))
    assert message in str(err.value) and "list each value once" in str(err.value), str(err.value)


def test_a_variable_the_spec_never_uses_is_refused():
    with pytest.raises(ValueError) as err:
        expand(spec(), vars={"modle": "organism"})
    text = str(err.value)
    assert "--var modle=" in text and "never uses ${modle}" in text and "did you mean 'model'" in text
    assert "its variables are model" in text
    assert expand(spec(), vars={"model": "organism:ci"})  # a used variable is fine
    with pytest.raises(ValueError, match="it has no variables: drop --var x"):
        expand(spec(vars={}, models=["organism:ci"]), vars={"x": "1"})


def test_an_undefined_variable_names_the_option():
    with pytest.raises(ValueError) as err:
        expand(spec(vars={}))
    text = str(err.value)
    assert text.startswith("spec: models[0]: ${model} is not defined") and "pass --var model=VALUE" in text


CLI_ERRORS = {
    "probe steps -1": ({"evaluations": {"probes": {"steps": -1}}}, [], "evaluations.probes.steps must be"),
    "unknown format": ({"evaluations": {"formats": ["normal", "xyz"]}}, [], "'xyz' is not a format"),
    "negative maintain batch": ({"edit": {"maintain_batch": -32}}, [], "maintain_batch must be positive"),
    "variable typo": ({}, ["--var", "modle=organism:ci"], "never uses ${modle}"),
    "undefined variable": ({"vars": {}}, [], "pass --var model=VALUE"),
    "seeds twice": ({"seeds": [0, 0]}, [], "seeds: 0 is listed twice"),
}


@pytest.mark.parametrize("case", list(CLI_ERRORS))
@pytest.mark.parametrize("dry_run", [False, True])
def test_cli_refuses_them_in_one_line_before_loading(case, dry_run, tmp_path, capsys, no_loading):
    change, extra, message = CLI_ERRORS[case]
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec(**change)))
    args = ["sweep", str(path), "--out", str(tmp_path / "r.jsonl"), *extra, *(["--dry-run"] if dry_run else [])]
    code, _, err = run_main(args, capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r.jsonl").exists()
