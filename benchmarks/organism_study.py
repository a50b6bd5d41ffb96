"""Organism settings whose sport lookup at the subject's last token spans several layers (issue 13).

    python benchmarks/organism_study.py                          # every candidate (trains the missing ones)
    python benchmarks/organism_study.py --only demo,conjunctive  # some of them; other entries of the JSON are kept
    python benchmarks/organism_study.py --list

Each candidate is an ``OrganismConfig``; ``load_organism`` trains it once into ``--cache`` (its own hash cache),
one candidate at a time, on one torch thread, with the demo's portable kernels (``--native-kernels``: this CPU's
own). Per candidate the JSON records the settings, training wall and CPU seconds (from the checkpoint's report;
the load average around a training run is recorded when this run trained it), argmax accuracy per format, FLU's
probe curves at the subject's last token (accuracy before each layer, after its attention, after its MLP), FLU's
MLP layers and the attention layers the same rule implicates, and how the probe's rise splits between attention
and MLPs. The criteria of issue 13 are checked per candidate: >= 2 MLP layers each raising the probe by >= 0.05
(FLU's rule), min argmax accuracy over the reported formats >= 0.95, training within about 2 minutes.

Writes benchmarks/results/CPU/organism_study.json (with provenance), organism_study.png (probe curves) and
organism_study.md (the JSON as tables).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MIN_GAIN = 0.05
MIN_ACCURACY = 0.95
MAX_TRAIN_CPU_S = 120.0  # "trains within about 2 minutes on 2 cores" (one training thread)
FORGET_SPLIT = "first_64_unsplit"  # the demo's; FLU pools forget and maintain facts, so every athlete is probed


@dataclass(frozen=True)
class Candidate:
    name: str
    make: Callable[[], Any]  # -> OrganismConfig
    note: str


def candidates() -> list[Candidate]:
    from mu_fast.organism import OrganismConfig as C

    return [
        Candidate("demo", C.demo, "today's demo preset: 4 layers, width 64, 600 athletes, 600 steps"),
        Candidate("conjunctive", lambda: C(conjunctive=True, steps=800),
                  "issue 13's conjunctive organism: sports balanced within every name part"),
        # Narrow MLPs: if one MLP cannot hold every whole-name lookup, the lookup has to spread over layers.
        Candidate("conj_L6_mlp96", lambda: C(conjunctive=True, steps=800, n_layers=6, d_mlp=96),
                  "conjunctive, 6 layers, MLP width 96 (of 256)"),
        Candidate("conj_L4_mlp64", lambda: C(conjunctive=True, steps=800, d_mlp=64),
                  "conjunctive, 4 layers, MLP width 64"),
        # A weak first attention: if layer 0 cannot gather the whole name, a later layer has to finish the lookup.
        Candidate("conj_L4_1head16", lambda: C(conjunctive=True, steps=800, n_heads=1, n_kv_heads=1, head_dim=16),
                  "conjunctive, 4 layers, one attention head of width 16 per layer"),
        Candidate("conj_L6_1head16_mlp64", lambda: C(conjunctive=True, steps=800, n_layers=6, n_heads=1,
                                                          n_kv_heads=1, head_dim=16, d_mlp=64),
                  "conjunctive, 6 layers, one attention head of width 16, MLP width 64"),
        Candidate("conj_L4_1head8_mlp64", lambda: C(conjunctive=True, steps=800, n_heads=1, n_kv_heads=1,
                                                         head_dim=8, d_mlp=64),
                  "conjunctive, 4 layers, one attention head of width 8, MLP width 64"),
        # The same settings on other seeds (other facts and initialisation): is the spread a property of the settings?
        *(Candidate(f"conj_L4_1head8_mlp64_seed{seed}",
                    lambda seed=seed: C(conjunctive=True, steps=800, n_heads=1, n_kv_heads=1, head_dim=8, d_mlp=64,
                                             seed=seed),
                    f"conj_L4_1head8_mlp64 with seed {seed}") for seed in (1, 2)),
        *(Candidate(f"conj_L6_1head16_mlp64_seed{seed}",
                    lambda seed=seed: C(conjunctive=True, steps=800, n_layers=6, n_heads=1, n_kv_heads=1,
                                             head_dim=16, d_mlp=64, seed=seed),
                    f"conj_L6_1head16_mlp64 with seed {seed}") for seed in (1, 2)),
        # Narrower still: MLP 0 alone should hold even less of the lookup.
        *(Candidate("conj_L4_1head8_mlp32" + (f"_seed{seed}" if seed else ""),
                    lambda seed=seed: C(conjunctive=True, steps=800, n_heads=1, n_kv_heads=1, head_dim=8, d_mlp=32,
                                             seed=seed),
                    f"conjunctive, 4 layers, one attention head of width 8, MLP width 32 (seed {seed})")
          for seed in (0, 1, 2)),
        # Seed 1's facts let MLP 0 finish alone at MLP width 32: narrower MLPs, or a narrower head.
        *(Candidate("conj_L4_1head8_mlp16" + (f"_seed{seed}" if seed else ""),
                    lambda seed=seed: C(conjunctive=True, steps=800, n_heads=1, n_kv_heads=1, head_dim=8, d_mlp=16,
                                             seed=seed),
                    f"conjunctive, 4 layers, one attention head of width 8, MLP width 16 (seed {seed})")
          for seed in (0, 1, 2)),
        *(Candidate("conj_L4_1head8_mlp24" + (f"_seed{seed}" if seed else ""),
                    lambda seed=seed: C(conjunctive=True, steps=800, n_heads=1, n_kv_heads=1, head_dim=8, d_mlp=24,
                                             seed=seed),
                    f"conjunctive, 4 layers, one attention head of width 8, MLP width 24 (seed {seed})")
          for seed in (0, 1, 2)),
        *(Candidate("conj_L4_1head4_mlp32" + (f"_seed{seed}" if seed else ""),
                    lambda seed=seed: C(conjunctive=True, steps=800, n_heads=1, n_kv_heads=1, head_dim=4, d_mlp=32,
                                             seed=seed),
                    f"conjunctive, 4 layers, one attention head of width 4, MLP width 32 (seed {seed})")
          for seed in (1,)),
    ]


# --------------------------------------------------------------------------------------------------- measuring
def study(candidate: Candidate, cache: Path) -> dict[str, Any]:
    """Train (or load) one candidate and measure it."""
    import torch

    from mu_fast.localize.flu import flu_localize
    from mu_fast.organism import FORMATS, checkpoint_dir, load_organism, organism_task

    config = candidate.make()
    fresh = not checkpoint_dir(config, cache).exists()
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    org = load_organism(config, cache_dir=cache, progress=False)
    load_seconds = time.perf_counter() - t0
    load_after = os.getloadavg()
    task = organism_task(org.facts, forget_split=FORGET_SPLIT, tokenizer=org.tokenizer)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        flu = flu_localize(org.model, org.tokenizer, task, min_gain=MIN_GAIN, seed=0, include_attention=True)
    finally:
        torch.set_num_threads(threads)
    accuracy = org.report["accuracy"]
    reported = [f for f in (*FORMATS, "activity") if f in accuracy]
    train = org.report["train"]
    n_test = int(flu.meta["n_test"])
    passing_mlps = [l for l in flu.layers if round(float(flu.mlp_gain[l]) * n_test) >= round(MIN_GAIN * n_test)]
    shares = flu.enrichment_shares()
    n_params = sum(p.numel() for p in org.model.parameters())
    n_embed = org.model.get_input_embeddings().weight.numel() + org.model.get_output_embeddings().weight.numel()
    entry = {
        "name": candidate.name,
        "note": candidate.note,
        "config": config.to_dict(),
        "config_hash": config.config_hash(),
        "params": n_params,
        "params_without_embeddings": n_params - n_embed,
        "trained_in_this_run": fresh,
        "train": {"wall_s": train["seconds"], "cpu_s": train["cpu_seconds"], "threads": train["threads"],
                  "steps": train["steps"], "final_loss": train["losses"][-1] if train["losses"] else None},
        "build_wall_s": load_seconds if fresh else None,  # training + the report's evaluation
        "load_average_before_after": [load_before, load_after] if fresh else None,
        "accuracy": accuracy,
        "min_accuracy": min(accuracy[f] for f in reported),
        "min_accuracy_format": min(reported, key=lambda f: accuracy[f]),
        "subject_probe": org.report["subject_probe"],
        "random_init_probe": org.report["random_init_probe"],
        "flu": flu.to_dict(),
        "flu_mlp_layers_passing": passing_mlps,
        "enrichment": shares,
    }
    entry["criteria"] = {
        "two_mlp_layers": len(passing_mlps) >= 2,
        "knows_facts": entry["min_accuracy"] >= MIN_ACCURACY,
        "trains_in_time": train["cpu_seconds"] <= MAX_TRAIN_CPU_S,
    }
    entry["meets_all"] = all(entry["criteria"].values())
    return entry


# ----------------------------------------------------------------------------------------------------- output
def provenance(portable: bool) -> dict[str, Any]:
    import torch
    import transformers

    from benchmarks.common import context
    from mu_fast.determinism import kernel_settings

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                   if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {**context(), "cpu": cpu, "cpu_count": os.cpu_count(), "transformers": transformers.__version__,
            "python": platform.python_version(), "kernels": kernel_settings(), "portable_requested": portable,
            "train_threads": 1, "torch_threads_default": torch.get_num_threads(),
            "criteria": {"min_mlp_gain": MIN_GAIN, "mlp_layers": 2, "min_accuracy": MIN_ACCURACY,
                         "max_train_cpu_s": MAX_TRAIN_CPU_S}}


def plot(entries: list[dict[str, Any]], path: Path) -> None:
    """One panel per candidate: probe accuracy along the residual stream (embeddings, then after each attention
    and each MLP), attention steps in orange, MLP steps in blue, FLU's MLP layers shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, len(entries))
    rows = -(-len(entries) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False, sharey=True)
    for ax, entry in zip(axes.flat, entries):
        flu = entry["flu"]
        pre, mid, post = flu["acc_pre"], flu["acc_mid"], flu["acc_post"]
        for layer in range(len(pre)):
            x = 2 * layer
            ax.plot([x, x + 1], [pre[layer], mid[layer]], color="tab:orange", marker="o", ms=3,
                    label="attention" if layer == 0 else None)
            ax.plot([x + 1, x + 2], [mid[layer], post[layer]], color="tab:blue", marker="o", ms=3,
                    label="MLP" if layer == 0 else None)
            if layer in flu["layers"]:
                ax.axvspan(x + 1, x + 2, color="tab:blue", alpha=0.12)
            if layer in flu.get("attn_layers", []):
                ax.axvspan(x, x + 1, color="tab:orange", alpha=0.12)
        ax.axhline(flu["chance"], color="grey", ls=":", lw=1)
        ax.set_xticks(range(0, 2 * len(pre) + 1, 2), [f"L{l}" for l in range(len(pre) + 1)])
        ok = "meets all" if entry["meets_all"] else "misses " + ", ".join(k for k, v in entry["criteria"].items() if not v)
        ax.set_title(f"{entry['name']} ({entry['train']['cpu_s']:.0f} CPU-s, min acc {entry['min_accuracy']:.2f})\n{ok}",
                     fontsize=8)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(entries):]:
        ax.axis("off")
    axes[0][0].set_ylabel("sport probe at subject's last token")
    axes[0][0].legend(fontsize=7, loc="lower right")
    title = textwrap.fill("Organism candidates: held-out probe accuracy before each layer, after attention, after "
                          "MLP (shaded: FLU-selected blocks)", width=int(11 * fig.get_figwidth()))
    fig.suptitle(title, fontsize=9)
    lines = title.count("\n") + 1
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.2 * lines / fig.get_figheight()))  # leave room for the suptitle
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary_line(e: dict[str, Any]) -> str:
    c = e["config"]
    curve = " ".join(f"{a:.2f}" for a in e["flu"]["acc_post"])
    attn = e["enrichment"]["attn_share"]
    return (f"{e['name']:<22} L{c['n_layers']} d{c['d_model']}/{c['d_mlp']} n{c['n_athletes']} steps {c['steps']} "
            f"conj {int(c['conjunctive'])} | cpu {e['train']['cpu_s']:.0f}s wall {e['train']['wall_s']:.0f}s | "
            f"min acc {e['min_accuracy']:.3f} ({e['min_accuracy_format']}) | post {curve} | FLU {e['flu']['layers']} "
            f"attn {e['flu']['attn_layers']} share {attn if attn is None else round(attn, 2)} | "
            f"{'ALL' if e['meets_all'] else ''}")


GENERATED_MARKER = "<!-- generated by benchmarks/organism_study.py below this line -->"


def markdown(result: dict[str, Any]) -> str:
    """organism_study.md: the JSON's measurements per candidate (settings, time, accuracy, FLU, probe curves)."""
    prov = result["provenance"]
    crit = prov["criteria"]
    lines = [
        "## Measurements",
        "",
        f"Generated by `benchmarks/organism_study.py` from `organism_study.json` (probe curves: `organism_study.png`). "
        f"CPU: {prov['cpu']} ({prov['cpu_count']} cores shared with other jobs), one training thread, "
        f"kernels: {'portable' if prov['kernels']['portable'] else 'native (' + str(prov['kernels']['torch_cpu_capability']) + ')'}.",
        "",
        f"Criteria (issue 13): at least {crit['mlp_layers']} MLP layers each raising the held-out sport probe at the "
        f"subject's last token by >= {crit['min_mlp_gain']} (FLU's rule, counted in facts); argmax accuracy >= "
        f"{crit['min_accuracy']} in every reported format; training <= {crit['max_train_cpu_s']:.0f} CPU-s.",
        "",
        "| candidate | layers | d_model / d_mlp | athletes | conj. | steps | params (non-emb.) | train CPU-s | train wall-s "
        "| min acc (format) | sport normal / qa / para / mcq | city / city_qa | FLU MLPs | attn layers | attn share | meets all |",
        "|" + "---|" * 16,
    ]
    for e in result["candidates"]:
        c, a, t = e["config"], e["accuracy"], e["train"]
        share = e["enrichment"]["attn_share"]
        missing = [k for k, v in e["criteria"].items() if not v]
        lines.append(
            f"| {e['name']} | {c['n_layers']} | {c['d_model']} / {c['d_mlp']} | {c['n_athletes']} | "
            f"{'yes' if c['conjunctive'] else 'no'} | {c['steps']} | {e['params_without_embeddings']:,} | "
            f"{t['cpu_s']:.0f} | {t['wall_s']:.0f} | {e['min_accuracy']:.3f} ({e['min_accuracy_format']}) | "
            f"{a['normal']:.3f} / {a['qa']:.3f} / {a['paraphrase']:.3f} / {a['mcq']:.3f} | "
            f"{a['city']:.2f} / {a['city_qa']:.2f} | {e['flu']['layers']} | {e['flu']['attn_layers']} | "
            f"{'n/a' if share is None else f'{share:.2f}'} | {'yes' if e['meets_all'] else 'no: ' + ', '.join(missing)} |")
    lines += ["", "## Probe curves (held-out sport probe accuracy at the subject's last token)", "",
              "`pre` = before the layer, `mid` = after its attention, `post` = after its MLP; "
              "gains are in fractions of the held-out facts.", ""]
    for e in result["candidates"]:
        f = e["flu"]
        fmt = lambda xs: " ".join(f"{x:.3f}" for x in xs)  # noqa: E731
        lines += [f"**{e['name']}** — {e['note']}; {f['n_test']} held-out facts, chance {f['chance']:.3f}; "
                  f"probe saturates at layer {e['enrichment']['saturation_layer']}.", "",
                  "```", f"pre       {fmt(f['acc_pre'])}", f"mid       {fmt(f['acc_mid'])}", f"post      {fmt(f['acc_post'])}",
                  f"attn gain {fmt(f['attn_gain'])}", f"mlp gain  {fmt(f['mlp_gain'])}", "```", ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "mu_fast" / "organism-study",
                        help="organism hash cache (a subfolder per kernel choice)")
    parser.add_argument("--only", default="", help="comma-separated candidate names")
    parser.add_argument("--list", action="store_true", help="list the candidates and exit")
    parser.add_argument("--native-kernels", action="store_true", help="this CPU's kernels instead of the portable ones")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "CPU" / "organism_study.json")
    args = parser.parse_args()

    from mu_fast.determinism import use_portable_kernels

    portable = use_portable_kernels() if not args.native_kernels else False  # before torch is imported
    table = {c.name: c for c in candidates()}
    if args.list:
        for c in table.values():
            print(f"{c.name:<22} {c.note}")
        return
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"unknown candidates {unknown}; --list shows them: {sorted(table)}")
    cache = args.cache / ("portable" if portable else "native")
    previous: dict[str, Any] = {}
    if args.out.exists():
        old = json.loads(args.out.read_text())
        if old.get("provenance", {}).get("kernels", {}).get("portable") == portable:
            previous = {e["name"]: e for e in old.get("candidates", [])}
    for name in names:
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {table[name].note}", flush=True)
        previous[name] = study(table[name], cache)
        print(summary_line(previous[name]), flush=True)
    entries = [previous[n] for n in table if n in previous]
    result = {"provenance": provenance(portable), "cache": str(cache), "candidates": entries}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(args.out)
    plot(entries, args.out.with_suffix(".png"))
    md = args.out.with_suffix(".md")
    # Hand-written findings above the marker survive a rerun; the tables below it are regenerated.
    notes = md.read_text().split(GENERATED_MARKER)[0] if md.exists() and GENERATED_MARKER in md.read_text() else ""
    md.write_text(notes + GENERATED_MARKER + "\n\n" + markdown(result))
    print("\n".join(summary_line(e) for e in entries))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
