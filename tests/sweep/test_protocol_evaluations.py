"""The registered protocol evaluations (softprompt, capability, paper_probes): a sweep spec on the CI organism that
asks for them runs (tiny steps) and records their results and metrics; bad settings fail when the spec is resolved;
(the skip of a capability task without offline data is tested in tests/evaluate/test_capability.py)."""

from __future__ import annotations

import json

import pytest

import mu_fast.sweep as sweep
from mu_fast.sweep.evaluations import resolve_evaluations


def local_mc_task(folder, task, name="organism_mc"):
    """An lm-eval multiple-choice task (local JSONL) from the organism's maintain-test facts."""
    classes = [c.strip() for c in task.classes]
    rows = [{"question": p, "choices": classes, "answer": classes.index(a.strip())}
            for p, a in zip(task.maintain_test.prompts[:12], task.maintain_test.answers[:12])]
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n  cache_dir: {folder / 'c'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{question}}\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{answer}}\"\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\nmetadata:\n  version: 1.0\n")
    return len(rows)


def test_sweep_on_the_organism_records_the_protocol_evaluations(organism_cache, tmp_path):
    pytest.importorskip("lm_eval", reason="lm-eval not installed (requirements.txt lists it)")
    spec = {
        "name": "protocol", "models": ["organism:ci"],
        "tasks": [{"dataset": "organism", "forget_splits": ["first_16_unsplit"]}], "methods": ["flu"],
        "edit": {"preset": "organism", "steps": 2, "lr": 3e-3, "maintain_batch": 16, "lm_batch": 4}, "seeds": [0],
        "evaluations": {"formats": ["normal"], "batch_size": 128,
                        "softprompt": {"n_attacks": 2, "steps": 2, "batch_size": 4},
                        "capability": {"tasks": ["organism_mc"], "task_dir": str(tmp_path), "batch_size": 16},
                        "paper_probes": True},
    }
    run = sweep.expand(spec)[0]
    session = sweep.ModelSession(run.model)
    task, n_layers = session.task(run.task), session.model.config.num_hidden_layers
    n_questions = local_mc_task(tmp_path, task)
    result = sweep.run(spec, store=tmp_path / "r.jsonl", progress=False)
    assert (result.ok, result.failed) == (1, 0), [r.get("error") for r in result.records]
    record = sweep.load_results(tmp_path / "r.jsonl")[0]
    results = record["results"]
    soft = results["softprompt"]
    assert soft["settings"]["steps"] == 2 and len(soft["attacks"]) == 2 and len(soft["attacks"][0]["loss"]) == 2
    assert 0 <= soft["metrics"]["softprompt_forget_acc"] <= 1 and 0.0 < soft["metrics"]["softprompt_maintain_acc"] <= 1.0
    cap = results["capability"]
    assert cap["tasks"]["organism_mc"]["n"] == n_questions and 0 <= cap["metrics"]["capability_organism_mc_acc"] <= 1
    probes = results["paper_probes"]
    assert probes["setting"] == "paper" and probes["layers"] == list(range(n_layers))
    assert 0 <= probes["metrics"]["paper_probes_max_forget_acc_true"] <= 1
    assert {"softprompt", "capability", "paper_probes"} <= set(record["timings"])
    assert record["config"]["evaluations"]["extra"]["softprompt"]["n_attacks"] == 2


@pytest.mark.parametrize("bad, match", [
    ({"softprompt": {"steps": 0}}, "softprompt.steps must be a positive integer or null"),
    ({"softprompt": {"autocast": "fp8"}}, "autocast must be null or 'paper'"),
    ({"capability": {"tasks": []}}, "capability.tasks must be a non-empty list"),
    ({"capability": {"limit": -1}}, "capability.limit must be null or a positive number"),
    ({"paper_probes": {"probe_backend": "gpu"}}, "probe_backend must be one of"),
    ({"softprompt": {"stepz": 3}}, "unknown setting 'stepz'"),
])
def test_bad_settings_fail_when_the_spec_is_resolved(bad, match):
    with pytest.raises(ValueError, match=match):
        resolve_evaluations(bad)
    assert resolve_evaluations({"capability": {"tasks": "sciq"}})["extra"]["capability"]["tasks"] == ["sciq"]
