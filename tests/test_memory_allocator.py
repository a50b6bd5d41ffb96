"""The caching-allocator model (mu_fast.memory.allocator) on hand-computed sequences, against torch's own allocator
when a GPU is present, and the plan's reserved bytes against the model's replay of traced edit steps."""

from __future__ import annotations

import os
import random

import pytest
import torch

from mu_fast.edit.loop import EditConfig
from mu_fast.memory import WORKSPACE_BYTES, BatchShape, plan
from mu_fast.memory.allocator import (AllocatorOutOfMemory, CachingAllocatorModel, allocator_slack, replay, round_size,
                                      segment_size, smallest_capacity)
from mu_fast.memory.trace import trace_peak
from mu_fast.models.tiny import make_config

MiB = 2**20


def run(sizes_and_frees: list, capacity: int | None = None) -> CachingAllocatorModel:
    """``[("a", name, bytes), ("f", name)]`` through a fresh model."""
    model, live = CachingAllocatorModel(capacity), {}
    for op in sizes_and_frees:
        if op[0] == "a":
            live[op[1]] = model.malloc(op[2])
        else:
            model.free(live.pop(op[1]))
    return model


# ------------------------------------------------------------------------------------------ the rules, by hand
@pytest.mark.parametrize("nbytes, rounded, segment", [
    (1, 512, 2 * MiB), (512, 512, 2 * MiB), (513, 1024, 2 * MiB), (MiB, MiB, 2 * MiB),  # small pool: 2 MiB segments
    (MiB + 1, MiB + 512, 20 * MiB), (10 * MiB - 512, 10 * MiB - 512, 20 * MiB),  # 1-10 MiB: 20 MiB segments
    (10 * MiB, 10 * MiB, 10 * MiB), (11 * MiB + 3, 11 * MiB + 512, 12 * MiB),  # larger: rounded up to 2 MiB
])
def test_rounding_and_segment_sizes(nbytes, rounded, segment):
    assert round_size(nbytes) == rounded and segment_size(rounded) == segment


def test_small_requests_share_a_two_mib_segment():
    m = run([("a", 1, 1000), ("a", 2, 3000)])
    assert (m.allocated, m.reserved, m.segments) == (1024 + 3072, 2 * MiB, 1)


def test_mid_requests_split_a_twenty_mib_segment_and_large_ones_get_their_own():
    m = run([("a", 1, 5 * MiB), ("a", 2, 5 * MiB)])
    assert (m.allocated, m.reserved, m.segments) == (10 * MiB, 20 * MiB, 1)  # the second reuses the remainder
    m = run([("a", 1, 5 * MiB), ("a", 2, 5 * MiB), ("a", 3, 11 * MiB)])  # 10 MiB left: too small for 11 MiB
    # a 12 MiB segment; its 1 MiB remainder is not split off (the large pool splits only above 1 MiB)
    assert (m.allocated, m.reserved, m.segments) == (22 * MiB, 32 * MiB, 2)


def test_a_remainder_of_at_most_one_mib_is_not_split_off_in_the_large_pool():
    m = run([("a", 1, 11 * MiB + MiB // 2)])  # segment 12 MiB, 0.5 MiB left: handed out whole
    assert (m.allocated, m.reserved) == (12 * MiB, 12 * MiB)
    m = run([("a", 1, 10 * MiB + MiB // 2)])  # 1.5 MiB left: split off
    assert (m.allocated, m.reserved) == (10 * MiB + MiB // 2, 12 * MiB)


def test_best_fit_reuse_and_fragmentation():
    # A freed 100 MiB block serves a 60 MiB request (split, 40 MiB left), which cannot serve the next 60 MiB.
    m = run([("a", "A", 100 * MiB), ("f", "A"), ("a", "B", 60 * MiB), ("a", "C", 60 * MiB)])
    assert (m.allocated, m.reserved, m.peak_reserved) == (120 * MiB, 160 * MiB, 160 * MiB)
    # Best fit: of two free blocks (100 and 70 MiB), a 60 MiB request takes the 70 MiB one.
    m = run([("a", "A", 100 * MiB), ("a", "B", 70 * MiB), ("f", "A"), ("f", "B"), ("a", "C", 60 * MiB),
             ("a", "D", 100 * MiB)])
    assert m.reserved == 170 * MiB


def test_freed_neighbours_merge():
    ops = [("a", "A", 100 * MiB), ("f", "A"), ("a", 1, 30 * MiB), ("a", 2, 30 * MiB), ("a", 3, 30 * MiB)]
    m = run(ops + [("f", 2), ("f", 1), ("a", "B", 60 * MiB)])  # 1 and 2 merge into 60 MiB: no new segment
    assert (m.reserved, m.segments, m.allocated) == (100 * MiB, 1, 90 * MiB)
    m = run(ops + [("f", 1), ("f", 3), ("a", "B", 60 * MiB)])  # 30 + 40 free but apart: a new segment
    assert (m.reserved, m.segments) == (160 * MiB, 2)


def test_capacity_releases_free_segments_before_running_out():
    ops = [("a", "A", 100 * MiB), ("f", "A"), ("a", "B", 150 * MiB)]
    assert run(ops).peak_reserved == 250 * MiB  # unlimited: the free 100 MiB segment stays cached
    m = run(ops, capacity=200 * MiB)  # 100 + 150 > 200: the wholly free segment is released first
    assert (m.reserved, m.peak_reserved, m.segments) == (150 * MiB, 150 * MiB, 1)
    with pytest.raises(AllocatorOutOfMemory):
        run(ops, capacity=140 * MiB)
    # A split segment is not released: 60 MiB of the 100 MiB segment are in use.
    with pytest.raises(AllocatorOutOfMemory):
        run([("a", "A", 100 * MiB), ("f", "A"), ("a", "B", 60 * MiB), ("a", "C", 60 * MiB)], capacity=150 * MiB)


def test_replay_and_smallest_capacity():
    events = [(1, 100 * MiB), (1, 0), (2, 150 * MiB)]
    result = replay(events)
    assert (result.peak_allocated, result.peak_reserved, result.fragmentation) == (150 * MiB, 250 * MiB, 100 * MiB)
    assert smallest_capacity(events) == 150 * MiB
    assert smallest_capacity([(1, 100 * MiB), (1, 0), (2, 60 * MiB), (3, 60 * MiB)]) == 160 * MiB


def test_double_free_is_an_error():
    m = CachingAllocatorModel()
    block = m.malloc(1000)
    m.free(block)
    with pytest.raises(ValueError, match="twice"):
        m.free(block)


def test_allocator_slack_is_the_stated_rule_rounded_up_to_two_mib():
    assert allocator_slack(0, 0) == 22 * MiB  # one 2 MiB small-pool and one 20 MiB large-pool segment
    assert allocator_slack(MiB + 1, 0) == 24 * MiB  # 22 + 1.5 × (1 MiB + 1 byte), rounded up
    assert allocator_slack(100 * MiB, 50 * MiB) == 198 * MiB  # 22 + 150 + 25 = 197, rounded up
    assert allocator_slack(0, 0, 100 * MiB) == 38 * MiB  # 22 + 15


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compares with torch's CUDA caching allocator")
def test_model_matches_torch_cuda_allocator():
    """A random sequence of small, mid and large allocations and frees: the model's peaks equal torch's."""
    if os.environ.get("PYTORCH_CUDA_ALLOC_CONF"):
        pytest.skip(f"PYTORCH_CUDA_ALLOC_CONF={os.environ['PYTORCH_CUDA_ALLOC_CONF']}: the model is of the defaults")
    rng = random.Random(0)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    if torch.cuda.memory_reserved():
        pytest.skip("another test holds CUDA memory; run this test alone")
    torch.cuda.reset_peak_memory_stats()
    live: dict[int, torch.Tensor] = {}
    events: list[tuple[int, int]] = []
    for key in range(400):
        if live and rng.random() < 0.45:
            gone = rng.choice(list(live))
            del live[gone]
            events.append((gone, 0))
        nbytes = rng.choice([rng.randint(1, MiB), rng.randint(MiB, 10 * MiB), rng.randint(10 * MiB, 200 * MiB)])
        live[key] = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        events.append((key, nbytes))
    expected = replay(events)
    assert torch.cuda.max_memory_allocated() == expected.peak_allocated
    assert torch.cuda.max_memory_reserved() == expected.peak_reserved


def test_the_gpu_check_replays_torchs_recorded_trace():
    """benchmarks/gpu_plan_reserved.py reads torch's allocation history (alloc / free_completed / segment_free
    entries, a run of segment_free = one empty_cache) and takes the peaks from the entry where torch's were reset."""
    from benchmarks.gpu_plan_reserved import replay_trace

    entries = [{"action": "alloc", "addr": 1, "size": 100 * MiB}, {"action": "segment_alloc", "addr": 1, "size": 0},
               {"action": "free_requested", "addr": 1, "size": 100 * MiB},
               {"action": "free_completed", "addr": 1, "size": 100 * MiB},
               {"action": "segment_free", "addr": 1, "size": 100 * MiB},  # empty_cache: the segment goes
               {"action": "alloc", "addr": 2, "size": 30 * MiB}, {"action": "alloc", "addr": 3, "size": 5 * MiB}]
    assert replay_trace(entries, mark=0) == {"model_peak_reserved": 100 * MiB, "model_peak_allocated": 100 * MiB,
                                             "model_segments": 2}
    after = replay_trace(entries, mark=5)  # peaks reset after the release
    assert (after["model_peak_reserved"], after["model_peak_allocated"]) == (50 * MiB, 35 * MiB)


# ------------------------------------------------------------------------- the plan against traced sequences
def mid_config(arch: str, layers: int = 4):
    """Small enough to trace in seconds, large enough that tensors land in all three segment classes."""
    config = make_config(arch, num_hidden_layers=layers, hidden_size=512, intermediate_size=1536, head_dim=64,
                         num_attention_heads=8, num_key_value_heads=4, vocab_size=8192)
    config._attn_implementation = "eager" if arch.startswith("gemma") else "sdpa"
    return config


@pytest.mark.parametrize("arch, mlps, settings", [
    ("llama", [1, 2], {}),
    ("llama", [2], {"grad_checkpointing": True}),
    ("gemma2", [1, 2], {"micro_batch": 32, "lm_micro_batch": 16}),
    ("qwen2", [0, 3], {"state_bits": 8, "lm_chunk_tokens": 64}),
    ("mistral", [1], {"optimizer": "torch"}),
])
def test_plan_reserves_what_the_allocator_model_reserves(arch, mlps, settings):
    """The plan's reserved bytes (its total without the stated cuBLAS workspace) hold the traced step's allocation
    sequence replayed through the caching-allocator model: rounding, segments and fragmentation."""
    from mu_fast.masks import Mask
    from mu_fast.models.sites import Component, SiteTable

    config = mid_config(arch)
    mask = Mask.from_components(SiteTable(config), [Component("mlp", layer) for layer in mlps])
    edit_config, batch = EditConfig(**settings), BatchShape(n_lm=32)
    planned = plan(config, mask, edit_config, batch=batch)
    traced = trace_peak(config, mask, edit_config, batch=batch, events=True)
    reserved = traced.allocator().peak_reserved
    assert reserved > traced.peak  # the allocator holds more than the tensors: the case the term exists for
    assert planned.total - WORKSPACE_BYTES >= reserved, (planned.breakdown, traced.peak, reserved)
