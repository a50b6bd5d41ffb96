"""``mu-fast run MODEL --preset paper --dataset counterfact --experiment forget_64_sequential``: the authors' sequential
CounterFact runs (authors_repo.md §3.6, their ``localized_finetuning_script_counterfact_sequential.py``).

Per method (the paper's five selections and the four baselines, as the authors' ``results_rebuttal_counterfact/
*_sequential`` runs): one sequential sweep run (``kind: sequential``, ``mu_fast.sweep.spec``; the spec is
``mu_fast.paper_protocol.paper_sequential_spec``) edits the 4 partitions in turn, each with its own mask
(``paper_sequential_masks``), then, after the last partition and on all 64 facts, runs the evaluations the authors'
script ran there (its ``do_full_mmlu_evals``, ``do_softprompt_evals`` and ``do_relearning_evals``): the relearning
attack (trained on the first 32 facts, scored on the last 32, as their ``first_64_split``), the soft-prompt attack
and lm-eval, each as the sweep runs it (``--no-relearn`` and ``--paper-evals`` turn them off). The sweep engine runs
it (store ``--out/paper_counterfact_<model>_forget_64_sequential.jsonl``, one record per partition step, appended
as each step finishes; a killed run resumes at the first step not recorded, replaying the recorded steps' edits;
failed runs are retried; ``--fresh`` starts a new store). The model is restored between methods. From the store it
writes ``out/<method>.json`` (partitions' records, final evaluations, edit settings, provenance) for every method
whose 4 steps are recorded, and prints a table.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mu_fast.sweep.sequence import final_evaluations, final_metrics  # noqa: F401 (their home before the engine ran this)


def run_sequential(model: str, key: str, protocol: Mapping[str, Any], methods: list[str], edit: Mapping[str, Any],
                   evaluations: Mapping[str, Any], texts: str | None, dtype: str, out: Path, seed: int = 0,
                   fresh: bool = False) -> None:
    """Run the sequential experiment (module docstring). evaluations: the spec's (``resolve_evaluations`` accepts
    them). seed: the edit's data order (EditConfig.seed, seed + p for partition p), the random baselines' draws and
    the attacks'. fresh: keep the earlier store aside and start a new one."""
    import mu_fast.sweep as sweep
    from mu_fast.paper_protocol import paper_sequential_spec
    from mu_fast.preflight import resolve_model, writing_output

    spec = paper_sequential_spec(dict(protocol), model_ref=model, lm_texts=texts, seeds=[seed])
    spec["methods"] = list(methods)
    spec["edit"] = {**spec["edit"], **edit}
    spec["evaluations"] = dict(evaluations)
    spec["models"] = [{**m, "dtype": dtype} for m in spec["models"]]
    store = out / f"{spec.pop('store').rsplit('/', 1)[-1]}"
    resolve_model(model)
    if fresh and store.exists():
        kept = store.with_name(f"{store.name}.{time.strftime('%Y%m%d-%H%M%S')}.old")
        store.rename(kept)
        print(f"--fresh: the earlier results are kept as {kept}")
    with writing_output("--out", out, "every step stored before is kept; free space or fix the path, then run again "
                        "to resume"):
        result = sweep.run(spec, store=store, retry_failed=True)  # a rerun after a fix retries the failed steps
    print(str(result))
    from mu_fast.sweep.store import load_results

    records = load_results(store, status=None)
    runs = {r.method: r for r in sweep.expand(spec)}
    rows, failures = [], []
    with writing_output("--out", out, f"the runs are kept in {store}"):
        for method in methods:
            steps = [_latest(records, runs[method].step_run(k).run_id) for k in range(runs[method].steps)]
            failed = next((r for r in steps if r is not None and r.get("status") != "ok"), None)
            if failed is not None or any(r is None for r in steps):
                error = (failed or {}).get("error") or {"type": "?", "message": "not recorded"}
                where = failed["config"]["step"] if failed else sum(r is not None for r in steps)
                failures.append(f"{method}: failed at step {where} ({error['type']}: {error['message']})")
                continue
            summary = method_summary(method, key, protocol["experiment"], steps, runs[method].evaluations, store)
            (out / f"{method.replace(':', '_')}.json").write_text(json.dumps(summary, indent=1, default=str))
            last = steps[-1]
            maintain = last["results"]["evals"].get("normal", {}).get("maintain", {}).get("acc")
            rows.append((method, [p["acc"] for p in last["results"]["per_partition"]], maintain,
                         summary["final_metrics"]))
    print_table(rows, out)
    for line in failures:
        print(line)
    if not rows:
        raise RuntimeError(f"no sequence of {store} finished ({failures[0] if failures else 'no record'}); fix the "
                           "cause and run again (the failed steps are retried; recorded ones are kept)")


def _latest(records: list[dict[str, Any]], run_id: str) -> dict[str, Any] | None:
    return next((r for r in records if r["run_id"] == run_id), None)


def method_summary(method: str, key: str, experiment: str, steps: list[dict[str, Any]],
                   evaluation_settings: Mapping[str, Any], store: Path) -> dict[str, Any]:
    """One method's ``<method>.json`` from its 4 step records: ``partitions`` (as ``sequential_edit`` returns them),
    ``final_evaluations`` and ``final_metrics`` (from the last step), the edit settings and the provenance."""
    partitions = []
    for record in steps:
        results = record["results"]
        partitions.append({"partition": record["config"]["step"], "task": record["localization"]["task"],
                           "trainable_elements": record["localization"]["trainable_params"], "edit": record["edit"],
                           "eval": {**results["evals"], "per_partition": results["per_partition"]}})
    results = steps[-1]["results"]
    final = {name: results[name] for name in results["final_evaluations"]}
    return {"method": method, "paper_model": key, "experiment": experiment, "edit_config": steps[-1]["config"]["edit"],
            "partitions": partitions, "final_evaluations": final, "final_metrics": final_metrics(final),
            "evaluation_settings": dict(evaluation_settings), "provenance": steps[-1]["provenance"],
            "store": str(store), "run_ids": [r["run_id"] for r in steps],
            "replayed": [r["sequence"]["replayed"] for r in steps]}


def print_table(rows: list[tuple[str, list[float], float | None, dict[str, Any]]], out: Path) -> None:
    """The methods' forget accuracy per partition after all 4 edits, maintain accuracy and the final evaluations."""
    def cell(value: Any) -> str:
        return "-" if value is None else value if isinstance(value, str) else f"{value:.3f}"

    print(f"{'method':14s} {'forget acc per partition after all 4 edits':44s} {'maintain':9s} {'relearned':9s} "
          f"{'softprompt':10s} {'MMLU':7s} (results: {out}/)")
    for method, accs, maintain, metrics in rows:
        shown = " ".join(f"{a:.3f}" for a in accs)
        print(f"{method:14s} {shown:44s} {cell(maintain):9s} {cell(metrics['relearn_acc']):9s} "
              f"{cell(metrics['softprompt_forget_acc']):10s} {cell(metrics['mmlu_acc']):7s}")
    print("relearned: held-out forget accuracy (true answer) after the relearning attack; softprompt: forget accuracy "
          "under the soft-prompt attack; MMLU: lm-eval accuracy (- = not run)")
