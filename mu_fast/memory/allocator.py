"""A model of torch's CUDA caching allocator (default settings, one stream): what a sequence of tensor allocations
and frees reserves on the device, beyond what it allocates.

The rules, as ``c10/cuda/CUDACachingAllocator.cpp`` (``DeviceCachingAllocator``) applies them with
``PYTORCH_CUDA_ALLOC_CONF`` unset:

* every request is rounded up to a multiple of 512 bytes (``round_size``; at least 512);
* requests of at most 1 MiB are served from the small pool, larger ones from the large pool;
* a request no cached block can serve makes a new segment (``cudaMalloc``) of ``segment_size``: 2 MiB in the small
  pool, 20 MiB for requests under 10 MiB, else the request rounded up to 2 MiB;
* the block chosen is the smallest free block of the pool that is large enough (best fit; equal sizes: the lower
  address); it is split when the remainder is at least 512 bytes (small pool) or more than 1 MiB (large pool), else
  handed out whole (and counted whole in ``allocated``, as ``max_memory_allocated`` counts it);
* a freed block merges with free neighbours of its own segment; segments are never returned to the device unless a
  new segment does not fit, when every wholly free segment is released and the segment is tried again
  (``release_cached_blocks``), and only then the allocation fails (out of memory).

Left out, because the default settings never use them: ``max_split_size_mb`` (oversize blocks, and
``release_available_cached_blocks``), ``roundup_power2_divisions``, ``garbage_collection_threshold`` and
``expandable_segments``; also streams (one stream: blocks never wait on events) and CUDA graph pools.

``reserved`` is ``torch.cuda.memory_reserved``, ``allocated`` is ``torch.cuda.memory_allocated``; their peaks are
the ``max_memory_*`` counterparts. ``replay`` runs a recorded sequence (``mu_fast.memory.trace`` records one).

**What the plan does with it** (the decision the plan's peak rests on). The plan's peak is reserved bytes: what the
edit needs the allocator to be allowed to hold, not only what its tensors hold. Two ways were open: model the
default allocator, or set ``expandable_segments:True`` (little fragmentation) and account for the rest. The setting
must be made before CUDA initialises in whatever process runs the edit (the CLI, a notebook, a Ray worker), which a
library cannot guarantee, so the plan models the default allocator, and a process that sets the option only gets
more headroom. The plan cannot replay a sequence per candidate (tracing a 9B step takes minutes), so it adds
``allocator_slack``: one partly used segment per pool, plus shares of the largest per-layer backward working set
(saved, recomputed and new tensors of one layer, freed and allocated in sizes that fit the cached blocks badly), of
the largest LM-head working set (the logit chunks) and of what a pass's forward leaves for its backward (gradients
that outlive the pass are carved out of those blocks and pin their segments). The shares are fitted, not derived:
on 35 traced edit steps (the 20 planned 7-9B rows of benchmarks/results/CPU/plan_vs_trace.json and 15 6-layer
7-9B-shape steps with and without checkpointing and micro-batches) the replayed reserved peak exceeded the tensor
peak by 0.03-2.2 GB; on a coarse grid, the shares that cover every step with at least 15% to spare at the least
mean excess are 1.5, 0.5 and 0.15 (one working set and one head, the first rule tried, left 4 of the 20 planned
rows short by up to 0.4 GB).
tests/test_memory.py and tests/test_memory_allocator.py check the rule on every traced step in CI, and
tests/test_memory_results.py on the committed 7-9B record. Its target is the reserved peak with unlimited memory (what
``max_memory_reserved`` shows on a large GPU; reached in the first step and unchanged in later ones), not the
smallest capacity the sequence runs in (``smallest_capacity``), which relies on torch releasing and re-allocating
cached segments inside every step (``cudaFree`` synchronises the device) and grew with the steps traced (0.24 to
0.72 GB above the tensor peak from one step to three, for a 6-layer Gemma-2-9B-shape edit).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass

MIN_BLOCK = 512  # kMinBlockSize
SMALL_SIZE = 1 << 20  # kSmallSize: the largest request of the small pool
SMALL_BUFFER = 2 << 20  # kSmallBuffer: the small pool's segments
LARGE_BUFFER = 20 << 20  # kLargeBuffer: segments for requests between 1 and 10 MiB
MIN_LARGE_ALLOC = 10 << 20  # kMinLargeAlloc
ROUND_LARGE = 2 << 20  # kRoundLarge: larger segments are rounded up to 2 MiB


class AllocatorOutOfMemory(RuntimeError):
    """A segment did not fit in the capacity, even after releasing every wholly free segment."""


def round_size(nbytes: int) -> int:
    """The bytes the allocator hands out for a request of ``nbytes`` (a multiple of 512, at least 512)."""
    return MIN_BLOCK if nbytes < MIN_BLOCK else -(-nbytes // MIN_BLOCK) * MIN_BLOCK


def segment_size(size: int) -> int:
    """The ``cudaMalloc`` a rounded request of ``size`` bytes makes when no cached block serves it."""
    if size <= SMALL_SIZE:
        return SMALL_BUFFER
    if size < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return -(-size // ROUND_LARGE) * ROUND_LARGE


@dataclass(eq=False)
class _Block:
    addr: int
    size: int
    small: bool
    allocated: bool = False
    prev: _Block | None = None
    next: _Block | None = None

    def key(self) -> tuple[int, int]:
        return self.size, self.addr


class CachingAllocatorModel:
    """The caching allocator's bookkeeping without memory. ``malloc(nbytes)`` returns a handle for ``free``.

    capacity: bytes the allocator may reserve (None: unlimited, as on a large GPU); past it, ``malloc`` releases
    cached segments as torch does, then raises ``AllocatorOutOfMemory``.
    """

    def __init__(self, capacity: int | None = None):
        self.capacity = capacity
        self.allocated = self.reserved = 0
        self.peak_allocated = self.peak_reserved = 0
        self.segments = 0
        self._free: dict[bool, list[tuple[int, int]]] = {True: [], False: []}  # pool (small?) -> sorted (size, addr)
        self._by_addr: dict[int, _Block] = {}  # free blocks
        self._next_addr = 0

    # ------------------------------------------------------------------------------------------------ the pools
    def _insert(self, block: _Block) -> None:
        bisect.insort(self._free[block.small], block.key())
        self._by_addr[block.addr] = block

    def _remove(self, block: _Block) -> None:
        pool = self._free[block.small]
        del pool[bisect.bisect_left(pool, block.key())]
        del self._by_addr[block.addr]

    def _best_fit(self, size: int, small: bool) -> _Block | None:
        pool = self._free[small]
        i = bisect.bisect_left(pool, (size, -1))
        if i == len(pool):
            return None
        block = self._by_addr[pool[i][1]]
        self._remove(block)
        return block

    def _new_segment(self, size: int, small: bool) -> _Block:
        alloc = segment_size(size)
        if self.capacity is not None and self.reserved + alloc > self.capacity:
            self.release_cached()
            if self.reserved + alloc > self.capacity:
                raise AllocatorOutOfMemory(
                    f"a {alloc}-byte segment does not fit: {self.reserved} reserved ({self.allocated} allocated) of "
                    f"{self.capacity}")
        block = _Block(self._next_addr, alloc, small)
        self._next_addr += alloc
        self.reserved += alloc
        self.segments += 1
        self.peak_reserved = max(self.peak_reserved, self.reserved)
        return block

    def release_cached(self) -> int:
        """Release every wholly free segment (``torch.cuda.empty_cache``); returns the bytes released."""
        released = 0
        for block in [b for b in self._by_addr.values() if b.prev is None and b.next is None]:
            self._remove(block)
            released += block.size
            self.segments -= 1
        self.reserved -= released
        return released

    # ------------------------------------------------------------------------------------------------ the API
    def malloc(self, nbytes: int) -> _Block:
        """Allocate ``nbytes`` (> 0); returns the block to ``free``."""
        size = round_size(nbytes)
        small = size <= SMALL_SIZE
        block = self._best_fit(size, small) or self._new_segment(size, small)
        remaining = block.size - size
        if remaining >= MIN_BLOCK if small else remaining > SMALL_SIZE:
            rest = _Block(block.addr + size, remaining, small, prev=block, next=block.next)
            if block.next is not None:
                block.next.prev = rest
            block.next, block.size = rest, size
            self._insert(rest)
        block.allocated = True
        self.allocated += block.size
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        return block

    def free(self, block: _Block) -> None:
        """Return ``block`` to its pool, merged with free neighbours of its segment."""
        if not block.allocated:
            raise ValueError("block freed twice")
        block.allocated = False
        self.allocated -= block.size
        for other in (block.prev, block.next):
            if other is not None and not other.allocated:
                self._remove(other)
                if other is block.prev:
                    block.addr, block.prev = other.addr, other.prev
                    if other.prev is not None:
                        other.prev.next = block
                else:
                    block.next = other.next
                    if other.next is not None:
                        other.next.prev = block
                block.size += other.size
        self._insert(block)


@dataclass(frozen=True)
class ReplayResult:
    """Peaks of one replay (bytes): ``peak_allocated`` (max_memory_allocated), ``peak_reserved``
    (max_memory_reserved); ``segments``: segments held at the end."""

    peak_allocated: int
    peak_reserved: int
    segments: int

    @property
    def fragmentation(self) -> int:
        """Reserved beyond allocated at the peaks: what the allocator holds that no tensor uses."""
        return self.peak_reserved - self.peak_allocated


def replay(events: Iterable[tuple[int, int]], capacity: int | None = None) -> ReplayResult:
    """Replay ``events`` through ``CachingAllocatorModel``: ``(key, nbytes)`` allocates ``nbytes`` under ``key``,
    ``(key, 0)`` frees it (zero-byte tensors allocate nothing and are never listed). Raises
    ``AllocatorOutOfMemory`` when ``capacity`` is given and the sequence does not fit in it."""
    model = CachingAllocatorModel(capacity)
    live: dict[int, _Block] = {}
    for key, nbytes in events:
        if nbytes:
            live[key] = model.malloc(nbytes)
        else:
            model.free(live.pop(key))
    return ReplayResult(model.peak_allocated, model.peak_reserved, model.segments)


def smallest_capacity(events: list[tuple[int, int]]) -> int:
    """The smallest capacity the sequence runs in without running out of memory (torch releases cached segments
    when a new one does not fit, so less than the unlimited peak reserved may do). Every segment is a multiple of
    2 MiB, so so is the answer; it is bisected between the peak allocated and the unlimited peak reserved bytes,
    taking "fits" as monotone in the capacity (near enough: a release can change later choices)."""
    free_run = replay(events)
    low, high = free_run.peak_allocated // ROUND_LARGE - 1, free_run.peak_reserved // ROUND_LARGE  # fails, fits
    while high - low > 1:
        mid = (low + high) // 2
        try:
            replay(events, capacity=mid * ROUND_LARGE)
            high = mid
        except AllocatorOutOfMemory:
            low = mid
    return high * ROUND_LARGE


SEGMENT_SLACK = SMALL_BUFFER + LARGE_BUFFER  # one partly used segment of each pool
# Coefficients of ``allocator_slack``, fitted on traced edit steps (see the module docstring).
LAYER_WORK_SHARE, HEAD_WORK_SHARE, SAVED_SHARE = 1.5, 0.5, 0.15


def allocator_slack(layer_work: float, head_work: float, saved: float = 0.0) -> int:
    """The plan's allowance for reserved-but-unallocated bytes at an edit step's peak (see the module docstring), to
    2 MiB: ``SEGMENT_SLACK`` + 1.5 × ``layer_work`` (the most one layer's backward holds: saved, recomputed and new
    tensors; the next layer's backward reuses those blocks only in part) + 0.5 × ``head_work`` (the LM head's logit
    tensors) + 0.15 × ``saved`` (what a pass's forward leaves for its backward: gradients that outlive the pass are
    carved out of those blocks and pin their segments for the next micro-batch)."""
    need = (SEGMENT_SLACK + LAYER_WORK_SHARE * max(0.0, layer_work) + HEAD_WORK_SHARE * max(0.0, head_work)
            + SAVED_SHARE * max(0.0, saved))
    return int(-(-int(need) // ROUND_LARGE) * ROUND_LARGE)
