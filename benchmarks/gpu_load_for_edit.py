"""GPU checks of loading for edits: random 7-9B models materialized on the GPU, and a checkpoint loaded with
masked layers on the GPU and frozen layers offloaded to the CPU and the disk.

1. ``build_random_model("gemma-2-9b", device="cuda", frozen=...)`` with the paper's sports FLU layers (MLPs 2-6)
   trainable: seconds, final and peak allocated memory (peak - final = the transient: one bf16 matrix when
   quantizing), one forward + backward of a 4 x 64 batch (gradients only on masked parameters).
2. A Llama-3-8B-shaped checkpoint of 4 layers (vocab 32000) saved to disk, then ``load_for_edit`` with MLP 1
   masked: bf16 on the GPU (peak vs the checkpoint size: nothing materialized twice), and int8 / nf4 under a
   small ``max_memory`` with ``offload_dir`` (device-map summary; forward + backward still reach the masked layer).

Run on the GPU machine: python benchmarks/gpu_load_for_edit.py [out.json]
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mu_fast.models import build_random_model, load_for_edit, shipped_config  # noqa: E402
from mu_fast.models.frozen import is_quantized  # noqa: E402

GiB = 2**30
FLU = [f"model.layers.{L}.mlp.{m}" for L in range(2, 7) for m in ("gate_proj", "up_proj", "down_proj")]


def step(model, batch: int = 4, tokens: int = 64) -> dict:
    """One forward + backward of the mean logit; which parameters got gradients."""
    ids = torch.randint(0, model.config.vocab_size, (batch, tokens), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    out = model(input_ids=ids).logits.float().mean()
    out.backward()
    grads = sorted(n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0)
    return {"loss_finite": bool(torch.isfinite(out)), "params_with_grad": len(grads), "step_peak_gib": torch.cuda.max_memory_allocated() / GiB,
            "grads_only_masked": all(".mlp." in n for n in grads)}


def random_models() -> dict:
    out = {}
    for frozen in ("nf4", "int8", "bf16"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        model = build_random_model("gemma-2-9b", device="cuda", frozen=frozen, trainable_modules=FLU)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        final, peak = torch.cuda.memory_allocated() / GiB, torch.cuda.max_memory_allocated() / GiB
        row = {"seconds": round(seconds, 2), "final_gib": round(final, 3), "peak_gib": round(peak, 3),
               "transient_gib": round(peak - final, 3),
               "quantized_modules": sum(1 for m in model.modules() if is_quantized(m))}
        row.update(step(model))
        out[frozen] = row
        print("random gemma-2-9b", frozen, row, flush=True)
        del model
    return out


def checkpoint_loads(tmp: Path) -> dict:
    config = shipped_config("llama-3-8b", num_hidden_layers=4, vocab_size=32000, bos_token_id=1, eos_token_id=2)
    model = build_random_model(config, device="cuda")
    size = sum(p.numel() * p.element_size() for p in model.parameters()) / GiB
    model.save_pretrained(tmp / "ckpt")
    del model
    mask = [f"model.layers.1.mlp.{m}.weight" for m in ("gate_proj", "up_proj", "down_proj")]
    out = {"checkpoint_gib": round(size, 3)}
    cases = [("bf16", None), ("int8", {0: "1GiB", "cpu": "1GiB"}), ("nf4", {0: "1GiB", "cpu": "0.3GiB"})]
    for frozen, budget in cases:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        offload = tmp / f"offload-{frozen}" if budget else None
        t0 = time.perf_counter()
        model, _, info = load_for_edit(tmp / "ckpt", mask, frozen=frozen, max_memory=budget, offload_dir=offload)
        row = {"seconds": round(time.perf_counter() - t0, 2), "max_memory": budget, "device_map": info["device_map"],
               "final_gib": round(torch.cuda.memory_allocated() / GiB, 3), "load_peak_gib": round(torch.cuda.max_memory_allocated() / GiB, 3),
               "masked_on": sorted({str(p.device) for n, p in model.named_parameters() if n in mask}),
               "quantized_modules": info["quantized_modules"]}
        row.update(step(model))
        out[frozen] = row
        print("checkpoint", frozen, row, flush=True)
        del model
    return out


def main() -> None:
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        results["random_gemma_2_9b"] = random_models()
        results["checkpoint_llama_3_8b_4_layers"] = checkpoint_loads(Path(tmp))
    text = json.dumps(results, indent=2)
    print(text)
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(text)


if __name__ == "__main__":
    main()
