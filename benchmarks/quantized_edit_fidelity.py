"""How much does an edit trained against int8 or nf4 frozen weights differ from one trained against bf16?

On the demo organism (Llama, 4 layers, width 64, d_mlp 256; trained on CPU and cached), cast to bf16: the
paper's FLU edit (the fact-lookup MLP layers chosen by ``localize("flu")``) of the first 64 athletes, injecting
a random other sport, with the organism preset's "lookup" edit settings (``organism_groups()``; results committed before issue 13 used
the earlier demo organism and its hand-tuned settings, both recorded in the JSON), three ways: every
non-masked Linear frozen in bf16, int8 (bitsandbytes LLM.int8()) or nf4 (QLoRA NF4). Each edit's delta (the
masked elements only) is then applied to the same bf16 base. Every accuracy is reported with the precision it
was measured in: ``trained`` (frozen precision the edit ran against) and ``evaluated`` (bf16 base with the
delta applied, or the quantized model the edit was trained on). Extra bf16 edits with other data-order seeds
show how much edits differ for reasons other than quantization.

Run:  python benchmarks/quantized_edit_fidelity.py   (CPU, a few minutes; MU_FAST_BENCH_THREADS, default 1)
Writes benchmarks/results/CPU/quantized_edit_fidelity.json (or results/<device>/ on a GPU machine).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, context, device_slug  # noqa: E402
from mu_fast.edit import apply_delta, edit, extract_delta, snapshot  # noqa: E402
from mu_fast.evaluate import evaluate_task  # noqa: E402
from mu_fast.localize import localize  # noqa: E402
from mu_fast.models import load_for_edit  # noqa: E402
from mu_fast.models.identity import versions  # noqa: E402
from mu_fast.organism import organism_task  # noqa: E402
from mu_fast.edit import EditConfig  # noqa: E402
from mu_fast.organism.lr_choice import organism_groups  # noqa: E402
from mu_fast.sweep.one_run import summarize  # noqa: E402

FROZEN = ("bf16", "int8", "nf4")
EXTRA_BF16_SEEDS = (1, 2)
METRICS = ("forget_err", "edit_acc", "maintain_acc", "mcq_edit_acc", "paraphrase_edit_acc", "other_attr_acc")


def _metrics(model: Any, tokenizer: Any, task: Any) -> dict[str, float]:
    with torch.no_grad():
        evals = evaluate_task(model, tokenizer, task, batch_size=64)
    summary = summarize({"trainable_params": 0}, evals, None, None, 0.0)
    return {k: round(float(summary[k]), 4) for k in METRICS if k in summary}


def _delta_distance(a: Any, b: Any, base: dict[str, torch.Tensor]) -> dict[str, float]:
    """Relative L2 distance and cosine between the updates (values - base) of two deltas, over all masked elements."""
    ua = torch.cat([(a.values[n].double() - base[n].double()) for n in a.values])
    ub = torch.cat([(b.values[n].double() - base[n].double()) for n in b.values])
    return {"rel_l2": round(float((ua - ub).norm() / ub.norm()), 4),
            "cosine": round(float(torch.nn.functional.cosine_similarity(ua, ub, dim=0)), 4)}


def main() -> dict[str, Any]:
    torch.set_num_threads(int(os.environ.get("MU_FAST_BENCH_THREADS", "1")))
    start = time.perf_counter()
    base, tokenizer, info = load_for_edit("organism", ["model.layers.0.mlp.up_proj.weight"], frozen="bf16")
    organism = info["organism"]
    task = organism_task(organism, forget_split="first_64_unsplit", inject_label="random_without_golf")
    loc = localize("flu", base, tokenizer, task)
    mask = loc.mask
    config = EditConfig(**organism_groups()["lookup"])
    print(f"organism {organism.path.name}: FLU layers {loc.info['flu']['layers']}, {mask.param_count():,} masked "
          f"elements, edit {config.steps} steps lr {config.lr}", flush=True)
    from mu_fast.edit.delta import compact

    base_values = {n: compact(p, mask[n]).to("cpu") for n, p in base.named_parameters() if n in mask}
    rows: dict[str, dict[str, Any]] = {"before edit": {"trained": "-", "evaluated": "bf16", **_metrics(base, tokenizer, task)}}
    deltas = {}
    runs = [(f, 0) for f in FROZEN] + [("bf16", s) for s in EXTRA_BF16_SEEDS]
    for frozen, seed in runs:
        label = frozen if seed == 0 else f"bf16 seed {seed}"
        model, _, run_info = load_for_edit("organism", mask, frozen=frozen)
        if seed == 0 and frozen != "bf16":
            rows[f"before edit ({frozen} frozen)"] = {"trained": "-", "evaluated": f"{frozen} frozen",
                                                      **_metrics(model, tokenizer, task)}
        before = snapshot(model, list(mask))
        t0 = time.perf_counter()
        result = edit(model, tokenizer, task, mask, replace(config, seed=seed), progress=False)
        seconds = time.perf_counter() - t0
        delta = extract_delta(model, mask, base=before, info=run_info, edit_config=replace(config, seed=seed))
        deltas[label] = delta
        if frozen != "bf16":
            rows[f"{frozen}-trained, on {frozen} model"] = {"trained": frozen, "evaluated": f"{frozen} frozen",
                                                            **_metrics(model, tokenizer, task), "edit_seconds": round(seconds, 1)}
        applied = apply_delta(load_for_edit("organism", mask, frozen="bf16")[0], delta)
        rows[f"{label}-trained, on bf16"] = {"trained": frozen, "evaluated": "bf16 + delta",
                                              **_metrics(applied, tokenizer, task), "edit_seconds": round(seconds, 1),
                                              "final_forget_loss": round(result.history[-1]["forget_loss"], 4)}
        print(f"  {label}: edit {seconds:.1f} s", flush=True)
        del model, applied
    distances = {label: _delta_distance(d, deltas["bf16"], base_values) for label, d in deltas.items() if label != "bf16"}
    out = {
        "benchmark": "quantized_edit_fidelity",
        "context": context(),
        "versions": versions(),
        "threads": torch.get_num_threads(),
        "organism": {"path": str(organism.path), "config_hash": organism.config.config_hash(),
                     "config": organism.config.to_dict()},
        "task": {"name": task.name, "forget_split": "first_64_unsplit", "inject_label": "random_without_golf",
                 "n_forget": len(task.forget_train)},
        "mask": {"method": "flu", "layers": loc.info["flu"]["layers"], "params": list(mask), "elements": mask.param_count()},
        "edit_config": asdict(config),
        "precision_note": "'trained': frozen precision of the non-masked Linear layers during the edit; 'evaluated': "
                          "the model the numbers were measured on (bf16 base + the edit's delta, or the quantized "
                          "model the edit was trained on). Masked modules and the LM head are bf16 throughout.",
        "rows": rows,
        "delta_vs_bf16_trained": distances,
        "seconds": round(time.perf_counter() - start, 1),
    }
    _print_table(rows, distances)
    path = RESULTS / device_slug() / "quantized_edit_fidelity.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=2))
    os.replace(tmp, path)
    print(f"wrote {path}")
    return out


def _print_table(rows: dict[str, dict[str, Any]], distances: dict[str, dict[str, float]]) -> None:
    cols = ("trained", "evaluated", *METRICS)
    width = max(len(r) for r in rows) + 2
    print("\n" + "row".ljust(width) + "".join(c[:14].rjust(16) for c in cols))
    for name, row in rows.items():
        cells = [str(row.get(c, "")) if not isinstance(row.get(c), float) else f"{row[c]:.3f}" for c in cols]
        print(name.ljust(width) + "".join(c.rjust(16) for c in cells))
    for label, d in distances.items():
        print(f"update of the {label}-trained edit vs the bf16-trained one: relative L2 {d['rel_l2']:.3f}, cosine {d['cosine']:.3f}")


if __name__ == "__main__":
    main()
