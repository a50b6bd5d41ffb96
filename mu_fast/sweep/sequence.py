"""The parts of a sequential run (``kind: sequential``, ``mu_fast.sweep.spec``) that are not the session's: the
evaluations after the last partition and the numbers each step's record carries.

``final_evaluations`` is what the authors' sequential script ran after its last partition (their
``do_relearning_evals``, ``do_softprompt_evals``, ``do_full_mmlu_evals``), on all facts: the sweep's ``evaluations``
other than the formats, run as a single run runs them. ``final_metrics`` picks the few numbers the sequential
table shows. ``step_metrics`` is a step record's ``metrics``: ``mu_fast.sweep.one_run.summarize`` of the evaluation on
all partitions' facts (forget_err, maintain_acc, ...; relearn_acc and probe_true_acc on the last step), each
partition's forget accuracy (``partition_<p>_forget_acc``, the training format on that partition's facts) and, on
the last step, ``final_metrics``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def final_evaluations(model: Any, tokenizer: Any, task: Any, evaluations: Mapping[str, Any], seed: int,
                      progress: bool = True) -> dict[str, Any]:
    """The resolved sweep ``evaluations`` (``resolve_evaluations``) other than the formats, run on the edited
    ``model`` as a sweep run does: ``relearn`` (evaluated at steps 0, steps // 2 and steps), ``probes`` and the
    registered ones (``softprompt``, ``capability``, ...). Returns ``{name: result}``; the model is left unchanged."""
    from mu_fast.evaluate import latent_probes, relearn_attack
    from mu_fast.sweep.evaluations import REGISTRY

    out: dict[str, Any] = {}
    if evaluations.get("relearn") is not None:
        settings = dict(evaluations["relearn"])
        steps = settings["steps"]
        out["relearn"] = relearn_attack(model, tokenizer, task, seed=seed, eval_batch_size=evaluations["batch_size"],
                                        progress=progress, eval_at=tuple(sorted({0, steps // 2, steps})), **settings)
    if evaluations.get("probes") is not None and task.classes:
        out["latent_probes"] = latent_probes(model, tokenizer, task, batch_size=evaluations["batch_size"],
                                             **evaluations["probes"])
    for name, settings in (evaluations.get("extra") or {}).items():
        out[name] = REGISTRY[name].fn(model, tokenizer, task, settings, seed)
    return out


def final_metrics(final: Mapping[str, Any]) -> dict[str, Any]:
    """The few numbers the table shows: held-out accuracy after relearning, forget accuracy under the soft-prompt
    attack, and each lm-eval task's accuracy (None where not run; "skipped" where skipped)."""
    relearn = final.get("relearn")
    metrics: dict[str, Any] = {"relearn_acc": None if relearn is None or relearn["final"] is None
                               else relearn["final"]["normal"]["acc"]}
    soft = final.get("softprompt")
    metrics["softprompt_forget_acc"] = None if soft is None else soft["metrics"]["softprompt_forget_acc"]
    capability = final.get("capability")
    metrics["mmlu_acc"] = (None if capability is None else "skipped" if "skipped" in capability
                           else capability["metrics"].get("capability_mmlu_acc"))
    return metrics


def step_metrics(partition: Mapping[str, Any], final: Mapping[str, Any] | None, seconds: float) -> dict[str, Any]:
    """A step record's ``metrics`` (module docstring) from its ``sequential_steps`` record and, on the last step
    only, ``final_evaluations``' result (None on the other steps)."""
    from mu_fast.sweep.one_run import summarize

    evaluation = partition["eval"]
    relearn = None if final is None else final.get("relearn")
    out = summarize({"trainable_params": partition["trainable_elements"]}, evaluation,
                    relearn if relearn is not None and relearn.get("final") is not None else None,
                    None if final is None else final.get("latent_probes"), seconds)
    for p, scored in enumerate(evaluation.get("per_partition", [])):
        out[f"partition_{p}_forget_acc"] = scored["acc"]
    if final is not None:
        out.update({k: v for k, v in final_metrics(final).items() if v is not None})
    return out
