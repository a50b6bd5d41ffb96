"""``kind: sequential`` sweep runs on a tiny CounterFact setup (tests/sweep/_sequential_setup.py): the same
per-partition numbers and final evaluations as ``sequential_edit`` + ``final_evaluations`` (the path the CLI took
before the engine ran it), one record per step with its own run id, a sequence resumed from the store's recorded
steps (replayed, not recomputed) ending as an uninterrupted one, a failed step ending its sequence, the model
restored afterwards, and records reaching the driver step by step through the processes executor."""

from __future__ import annotations

import json
import os

import pytest

import mu_fast.sweep as sweep
from mu_fast.sweep import evaluations
from tests.sweep import _sequential_setup as setup


@pytest.fixture
def small_cf(data_dir, tmp_path_factory):
    """The small partitions installed in this process; yields a function making a checkpoint of ``layers``."""
    setup.install()
    made = {}

    def ckpt(layers: int):
        if layers not in made:
            made[layers] = setup.checkpoint(tmp_path_factory.mktemp(f"ckpt{layers}"), layers)
        return made[layers]

    yield ckpt
    setup.uninstall()


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def comparable(metrics):
    return {k: v for k, v in metrics.items() if k != "seconds"}


def test_a_sequence_gives_the_numbers_of_sequential_edit(small_cf, tmp_path):
    """paper:flu on a 20-layer stand-in for Gemma-7B (its CounterFact FLU layers lie below 20), 1 step per
    partition, relearning after the last: the engine's 4 records hold sequential_edit's per-partition accuracies
    and maintain accuracy after each partition, and final_evaluations' relearning numbers on the last."""
    from mu_fast.data import counterfact_sequential_tasks
    from mu_fast.edit.loop import EditConfig
    from mu_fast.edit.sequential import all_facts_task, sequential_edit
    from mu_fast.models.loading import load_model
    from mu_fast.paper_protocol import paper_sequential_masks
    from mu_fast.sweep.presets import preset_groups
    from mu_fast.sweep.sequence import final_evaluations, final_metrics

    ckpt = small_cf(20)
    spec = setup.spec(ckpt, ["paper:flu"], steps=1, relearn=True)
    store = tmp_path / "s.jsonl"
    result = sweep.run(spec, store=store, progress=False)
    assert (result.total, result.ok, result.failed, result.unit) == (4, 4, 0, "steps")
    records = lines(store)
    (run,) = sweep.expand(spec)
    assert [r["run_id"] for r in records] == [run.step_run(k).run_id for k in range(4)]
    assert len({run.run_id, *(r["run_id"] for r in records)}) == 5  # every step its own id, none the sequence's
    assert [r["config"]["step"] for r in records] == [0, 1, 2, 3]
    assert all(r["config"]["sequence_id"] == r["sequence"]["id"] == run.run_id for r in records)
    assert [r["sequence"]["replayed"] for r in records] == [0] * 4 and records[-1]["sequence"]["last"]

    # today's path (mu_fast.cli.paper_sequential before the engine): its EditConfig, masks, edit and evaluations
    net, tokenizer, _ = load_model(str(ckpt), dtype="fp32", progress=False)
    fields = {"seed": 0, **preset_groups("paper_cf:gemma-7b:forget_64_sequential")["lookup"], "steps": 1,
              "maintain_batch": 8, "lm_coef": 0.0}
    config = EditConfig(**{**fields, "betas": tuple(fields.get("betas", (0.9, 0.999)))})
    assert records[0]["config"]["edit"] == {**vars(config), "betas": list(config.betas)}
    tasks = counterfact_sequential_tasks(model="gemma-7b", lm_texts=None)
    masks = paper_sequential_masks(net, "paper:flu", model_key="gemma-7b", seed=0)
    expected = sequential_edit(net, tokenizer, tasks, masks, config, formats=["normal"], eval_batch_size=64,
                               progress=False)
    final = json.loads(json.dumps(final_evaluations(net, tokenizer, all_facts_task(tasks), run.evaluations, 0,
                                                    progress=False)))
    for record, want in zip(records, expected, strict=True):
        assert record["status"] == "ok"
        assert record["localization"]["trainable_params"] == want["trainable_elements"]
        assert [p["acc"] for p in record["results"]["per_partition"]] == [p["acc"] for p in want["eval"]["per_partition"]]
        assert record["results"]["evals"]["normal"]["maintain"]["acc"] == want["eval"]["normal"]["maintain"]["acc"]
        assert record["metrics"]["maintain_acc"] == want["eval"]["normal"]["maintain"]["acc"]
        assert [record["metrics"][f"partition_{p}_forget_acc"] for p in range(4)] == \
            [p["acc"] for p in want["eval"]["per_partition"]]
        assert [h["forget_loss"] for h in record["edit"]["history"]] == [h["forget_loss"] for h in want["edit"]["history"]]
    assert records[-1]["results"]["relearn"]["final"] == final["relearn"]["final"]
    assert records[-1]["metrics"]["relearn_acc"] == final_metrics(final)["relearn_acc"] is not None
    assert records[-1]["results"]["final_evaluations"] == ["relearn"]
    assert all("relearn" not in r["results"] and "relearn_acc" not in r["metrics"] for r in records[:-1])


def test_resume_replays_the_recorded_steps_and_ends_as_an_uninterrupted_run(small_cf, tmp_path):
    """A store holding steps 0..k-1 of a finished run (as a run killed after step k-1 leaves it): the engine runs
    only steps k.., replaying 0..k-1 without recording them again, and their records equal the uninterrupted run's;
    a complete store runs nothing."""
    spec = setup.spec(small_cf(2), ["all_mlps"], steps=2, relearn=True)
    full = tmp_path / "full.jsonl"
    sweep.run(spec, store=full, progress=False)
    reference = lines(full)
    for k in (1, 3):
        store = tmp_path / f"after_{k}.jsonl"
        store.write_text("".join(line + "\n" for line in full.read_text().splitlines()[:k]))
        started = []
        result = sweep.run(spec, store=store, progress=False, on_run_start=started.append)
        assert [r.replay for r in started] == [k] and (result.skipped, result.ok, result.failed) == (k, 4 - k, 0)
        resumed = lines(store)
        assert [r["config"]["step"] for r in resumed] == [0, 1, 2, 3]  # no step recorded twice
        assert resumed[:k] == reference[:k]
        assert [r["sequence"]["replayed"] for r in resumed[k:]] == [k] * (4 - k)
        for got, want in zip(resumed, reference, strict=True):
            assert got["run_id"] == want["run_id"] and comparable(got["metrics"]) == comparable(want["metrics"])
        assert resumed[-1]["results"]["relearn"]["final"] == reference[-1]["results"]["relearn"]["final"]
    again = sweep.run(spec, store=full, progress=False)
    assert (again.skipped, again.ok, again.failed, len(lines(full))) == (4, 0, 0, 4)


def _boom(model, tokenizer, task, settings, seed):
    if os.environ.get("SEQ_TEST_FAIL") == "1":
        raise RuntimeError("final evaluation failed on purpose")
    return {"fine": True}


def test_a_failed_step_ends_its_sequence_and_a_retry_resumes_there(small_cf, tmp_path, monkeypatch):
    evaluations.register_evaluation("boom", _boom)
    try:
        spec = setup.spec(small_cf(2), ["all_mlps", "nonlocalized"], evaluations={"formats": ["normal"], "boom": True})
        store = tmp_path / "s.jsonl"
        monkeypatch.setenv("SEQ_TEST_FAIL", "1")
        result = sweep.run(spec, store=store, progress=False)
        assert (result.ok, result.failed) == (6, 2)  # both sequences: steps 0-2 ok, step 3 failed; the sweep went on
        failed = [r for r in lines(store) if r["status"] == "failed"]
        assert [r["config"]["step"] for r in failed] == [3, 3] and "on purpose" in failed[0]["error"]["message"]
        assert sweep.run(spec, store=store, progress=False).skipped == 8  # a failure counts as done ...
        monkeypatch.setenv("SEQ_TEST_FAIL", "0")
        started = []
        retried = sweep.run(spec, store=store, retry_failed=True, progress=False, on_run_start=started.append)
        assert [r.replay for r in started] == [3, 3] and (retried.ok, retried.failed) == (2, 0)  # ... until retried
        latest = sweep.load_results(store)
        assert len(latest) == 8 and all(r["results"]["boom"] == {"fine": True} for r in latest if r["config"]["step"] == 3)
    finally:
        evaluations.REGISTRY.pop("boom", None)


def test_the_session_restores_the_model_after_a_sequence_a_failure_and_an_abandoned_one(small_cf):
    from mu_fast.sweep.session import ModelSession
    from mu_fast.sweep.snapshot import fingerprint

    (run,) = sweep.expand(setup.spec(small_cf(2), ["all_mlps"]))
    session = ModelSession(run.model)
    start = fingerprint(session.model)
    assert [r["status"] for r in session.execute_sequence(run)] == ["ok"] * 4
    assert fingerprint(session.model) == start
    steps = session.execute_sequence(run)
    next(steps)
    assert fingerprint(session.model) != start  # edited while the caller holds a step
    steps.close()  # the caller stops (an interrupted sweep)
    assert fingerprint(session.model) == start
    broken = run.__class__.from_dict({**run.to_dict(), "method": "paper:nonexistent"})
    (failed,) = list(session.execute_sequence(broken))
    assert failed["status"] == "failed" and failed["config"]["step"] == 0 and "paper:nonexistent" in failed["error"]["message"]
    assert fingerprint(session.model) == start


@pytest.mark.parametrize("executor", ["processes", "ray"])
def test_executors_stream_each_steps_record(executor, small_cf, tmp_path, monkeypatch):
    """The last step's final evaluation (``gate``) waits until the driver has stored step 2's record: it finishes
    only if the worker process (or the Ray actor, whose sequence is one streaming-generator call) sent steps 0-2
    before its sequence ended."""
    if executor == "ray":
        pytest.importorskip("ray")
    setup.install_with_gate()
    try:
        gate = tmp_path / "gate"
        monkeypatch.setenv("SEQ_TEST_GATE", str(gate))
        store = tmp_path / "s.jsonl"
        seen = []

        def on_record(record):
            seen.append((record["config"]["step"], len(lines(store))))
            if record["config"]["step"] == 2:
                gate.touch()

        spec = setup.spec(small_cf(2), ["all_mlps"], evaluations={"formats": ["normal"], "gate": True})
        result = sweep.run(spec, store=store, executor=executor, workers=1, threads=1, progress=False,
                           setup=setup.install_with_gate, on_record=on_record)
        assert (result.ok, result.failed) == (4, 0), [r.get("error") for r in result.records]
        assert seen == [(0, 1), (1, 2), (2, 3), (3, 4)]  # each stored as it came
        assert lines(store)[-1]["results"]["gate"] == {"waited_for": "gate"}
    finally:
        evaluations.REGISTRY.pop("gate", None)


def test_report_rows_name_the_step(small_cf, tmp_path):
    from mu_fast.sweep.report import format_table

    store = tmp_path / "s.jsonl"
    sweep.run(setup.spec(small_cf(2), ["all_mlps"]), store=store, progress=False)
    table = format_table(store)
    assert all(f"all_mlps step={k}" in table for k in range(4)) and "averages" not in table


def test_a_worker_dying_mid_sequence_fails_the_step_in_flight(small_cf, tmp_path, monkeypatch):
    """The worker process exits during the first sequence's last step: steps 0-2 are stored, step 3 gets the failed
    record (stage worker), and a fresh worker runs the next sequence."""
    setup.install_with_die()
    try:
        monkeypatch.setenv("SEQ_TEST_DIE", str(tmp_path / "died"))
        store = tmp_path / "s.jsonl"
        spec = setup.spec(small_cf(2), ["all_mlps", "nonlocalized"], evaluations={"formats": ["normal"], "die_once": True})
        result = sweep.run(spec, store=store, executor="processes", workers=1, threads=1, progress=False,
                           setup=setup.install_with_die)
        assert (result.ok, result.failed) == (7, 1)
        records = lines(store)
        failed = next(r for r in records if r["status"] == "failed")
        first = sweep.expand(spec)[0]
        assert failed["run_id"] == first.step_run(3).run_id and failed["error"]["stage"] == "worker"
        assert "exit code 3" in failed["error"]["message"]
        assert [r["config"]["step"] for r in records if r["config"]["method"] == first.method] == [0, 1, 2, 3]
    finally:
        evaluations.REGISTRY.pop("die_once", None)


SEQ_ERRORS = {
    "partitions without the kind": ({"kind": "single", "partitions": 4}, "partitions: is for kind: sequential"),
    "unknown kind": ({"kind": "sequental"}, "did you mean 'sequential'"),
    "other partition count": ({"partitions": 8}, "set partitions: 4"),
    "a method without per-partition localizations": ({"methods": ["flu"]}, "has no per-partition localization"),
    "a budget": ({"budget": 1000}, "drop budget: or set budget: paper"),
    "another forget split": ({"tasks": [{"dataset": "counterfact", "forget_splits": ["first_16_unsplit"],
                                         "cf_model": "gemma-7b"}]}, r"forget_splits: \[first_64_unsplit\]"),
}


@pytest.mark.parametrize("case", list(SEQ_ERRORS))
def test_sequential_spec_errors_are_one_line(case, tmp_path):
    change, message = SEQ_ERRORS[case]
    (tmp_path / "config.json").write_text("{}")
    spec = {**setup.spec(tmp_path, ["all_mlps"]), **change}
    with pytest.raises(ValueError, match=message) as err:
        sweep.expand(spec)
    assert "\n" not in str(err.value) and str(err.value).startswith("spec: ")


def test_single_runs_keep_their_ids_and_config_keys():
    """Run kinds leave single runs as they were: no new config keys, the id of the identity without kind."""
    import hashlib

    from tests.sweep._fake_runs import SPEC

    run = sweep.expand(SPEC)[0]
    assert set(run.to_dict()) == {"run_id", "model", "task", "method", "budget", "seed", "edit", "evaluations",
                                  "group", "axes"}
    old = {"format": 1, "model": run.model, "task": run.task, "method": run.method, "budget": run.budget,
           "seed": run.seed, "edit": run.edit, "evaluations": run.evaluations}
    payload = json.dumps(old, sort_keys=True, separators=(",", ":"))
    assert run.run_id == hashlib.sha256(payload.encode()).hexdigest()[:16]
