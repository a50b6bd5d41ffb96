"""K edit configurations: K single ``edit`` calls against one ``edit_batched`` of K, same model, task and masks.

Model: organism-sized random Llama (``OrganismConfig.ci``'s shape: 4 layers, width 64, 4 heads of 16, MLP 256), fp32,
with a word-level tokenizer. Task: 16 forget facts, 128 maintain facts, 64 LM texts of about 40 tokens; every
``EditConfig`` default (maintain / LM batch 64, clip 1.0) but ``steps`` (``MU_FAST_BATCHED_STEPS``, default 5).
Configurations: K = 1, 4, 8 with three lrs (cycled) and seed = k; masks ``same`` (every configuration the FLU-like
mask, whole MLP layers 1-2: an lr x seed grid of one method) or ``mixed`` (cycling through four methods' masks: FLU-like
whole MLP layers, two heads + 16 neurons, one whole attention layer, 32 random neurons in MLPs 0 and 3).

* single: ``edit`` (its default optimizer, MaskedAdamW) once per configuration on the model, weights restored between
  configurations (outside the timed part);
* batched: ``edit_batched(model, ..., masks, configs)`` once (all K groups in one forward/backward per step);
* batched_pass1: the same with ``groups_per_pass=1`` (one group per forward/backward, one shared optimizer step).

One torch thread. Besides pytest-benchmark's rounds (1 each), the batched row times ``PAIRS`` interleaved (single,
batched, batched_pass1) triples in thread CPU time (time descheduled on a shared machine is not counted);
``extra_info`` records their medians, the median per-triple ratios ``speedup`` (single / batched) and
``speedup_pass1`` (single / batched_pass1) and the CPU model.

Measured (benchmarks/results/CPU/bench_batched_edit.json, AMD EPYC, 2 shared cores, 1 thread, 5 steps; medians of 2
interleaved triples, single / batched, single / batched_pass1): same mask K=1 0.99x / 0.88x, K=4 0.89x / 1.11x, K=8
0.85x / 1.04x; mixed masks K=4 0.71x / 0.96x, K=8 0.77x / 0.98x. On this CPU one pass over K groups is slower than K
passes: the step is GEMM-bound at one thread, the K-fold activations fall out of cache (the same silu took 2.4x
the time over 4x the rows), and with mixed masks every group back-propagates down to the lowest masked layer of any
group.

Run: ``pytest benchmarks/bench_batched_edit.py --benchmark-only --benchmark-json
benchmarks/results/CPU/bench_batched_edit.json`` (``-k "K4"`` for one K).
"""

from __future__ import annotations

import os
import statistics
import time

import pytest
import torch

from benchmarks.common import context
from mu_fast.data.base import FactTask, PromptSet
from mu_fast.edit.batched import edit_batched
from mu_fast.edit.loop import EditConfig, edit
from mu_fast.masks import Mask
from mu_fast.models.sites import Component, SiteTable
from mu_fast.models.tiny import make_tiny_model

STEPS = int(os.environ.get("MU_FAST_BATCHED_STEPS", "5"))
PAIRS = int(os.environ.get("MU_FAST_BATCHED_PAIRS", "2"))
KS = (1, 4, 8)
LRS = (1e-3, 3e-3, 1e-2)
SPORTS = [" football", " baseball", " basketball"]


def _task_and_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    first = [f"F{i}" for i in range(12)]
    last = [f"L{i}" for i in range(12)]
    names = [f"{a} {b}" for a in first for b in last][:144]
    filler = [f"w{i}" for i in range(200)]
    words = ["Fact", ":", "plays", "the", "sport", "of", "football", "baseball", "basketball"] + first + last + filler
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for w in words:
        vocab.setdefault(w, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    gen = torch.Generator().manual_seed(0)
    sport = [SPORTS[i % 3] for i in range(len(names))]

    def ps(idx, name):
        return PromptSet([f"Fact: {names[i]} plays the sport of" for i in idx], [sport[i] for i in idx],
                         [SPORTS[(SPORTS.index(sport[i]) + 1) % 3] for i in idx], choices=SPORTS, label_token="last",
                         name=name)

    forget, maintain = ps(range(16), "forget"), ps(range(16, 144), "maintain")
    lm_texts = [" ".join(filler[j] for j in torch.randint(0, 200, (40,), generator=gen).tolist()) for _ in range(64)]
    return FactTask("bench", forget, forget, maintain, maintain, lm_texts=lm_texts), tok


def _setup(K: int, which: str = "mixed"):
    task, tok = _task_and_tokenizer()
    model = make_tiny_model("llama", vocab_size=len(tok), hidden_size=64, intermediate_size=256, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=4, head_dim=16)
    t = SiteTable(model)
    g = torch.Generator().manual_seed(1)
    methods = [Mask.from_components(t, [Component("mlp", 1), Component("mlp", 2)]),
               Mask.from_components(t, [Component("attn", 1, 0), Component("attn", 2, 3)]
                                    + [Component("mlp", 1, i) for i in torch.randperm(256, generator=g)[:16].tolist()]),
               Mask.from_components(t, [Component("attn", 2)]),
               Mask.from_components(t, [Component("mlp", L, i) for L in (0, 3)
                                        for i in torch.randperm(256, generator=g)[:16].tolist()])]
    masks = [methods[k % len(methods)] if which == "mixed" else methods[0] for k in range(K)]
    configs = [EditConfig(steps=STEPS, lr=LRS[k % len(LRS)], seed=k) for k in range(K)]
    return model, tok, task, masks, configs


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown")
    except OSError:
        return "unknown"


@pytest.mark.parametrize("impl", ["single", "batched", "batched_pass1"])
@pytest.mark.parametrize("K", KS, ids=[f"K{k}" for k in KS])
@pytest.mark.parametrize("which", ["same", "mixed"])
def test_batched_edit(benchmark, which, K, impl):
    if K == 1 and which == "mixed":
        pytest.skip("K=1 has one mask")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, tok, task, masks, configs = _setup(K, which)
        base = {n: p.detach().clone() for n, p in model.named_parameters()}

        def restore():
            with torch.no_grad():
                for n, p in model.named_parameters():
                    p.copy_(base[n])

        def single():
            for mask, config in zip(masks, configs, strict=True):
                edit(model, tok, task, mask, config, progress=False)
                restore()

        def batched():
            edit_batched(model, tok, task, masks, configs)

        def batched_pass1():
            edit_batched(model, tok, task, masks, configs, groups_per_pass=1)

        def seconds(fn) -> float:
            t0 = time.thread_time()
            fn()
            return time.thread_time() - t0

        pairs = []
        if impl == "batched":  # the pairs once per K (the "single" row only times its own rounds)
            seconds(single), seconds(batched), seconds(batched_pass1)  # warm-up
            pairs = [(seconds(single), seconds(batched), seconds(batched_pass1)) for _ in range(PAIRS)]
        fn = {"single": single, "batched": batched, "batched_pass1": batched_pass1}[impl]
        benchmark.pedantic(fn, rounds=1, warmup_rounds=0, iterations=1)
        where = context()  # while at one thread (it records torch's thread count)
    finally:
        torch.set_num_threads(threads)
    benchmark.group = f"K={K} configurations, {which} masks, {STEPS} steps"
    benchmark.extra_info.update(impl=impl, K=K, masks=which, steps=STEPS, threads=1, cpu_model=_cpu_model(), **where)
    if pairs:
        benchmark.extra_info.update(
            interleaved_triples=PAIRS, interleaved_clock="thread_time", single_s=statistics.median(p[0] for p in pairs),
            batched_s=statistics.median(p[1] for p in pairs), batched_pass1_s=statistics.median(p[2] for p in pairs),
            speedup=statistics.median(p[0] / p[1] for p in pairs),
            speedup_pass1=statistics.median(p[0] / p[2] for p in pairs))
