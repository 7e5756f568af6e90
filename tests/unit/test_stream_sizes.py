"""How the stream sizes its requests (dtrain/data/stream.py): pure arithmetic, no cluster."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dtrain.data.stream import AUTO_PREFETCH_BYTES, auto_prefetch, ramped, row_bytes

pytestmark = pytest.mark.unit


@given(st.lists(st.integers(), min_size=0, max_size=300, unique=True), st.integers(1, 64), st.integers(1, 16))
@settings(max_examples=200, deadline=None)
def test_ramped_keeps_every_step_in_order_within_the_chunk(steps: list[int], chunk: int, first: int) -> None:
    chunks = ramped(steps, chunk, first)
    assert [s for c in chunks for s in c] == steps
    assert all(1 <= len(c) <= chunk for c in chunks)
    # Sizes never shrink except for the last (the tail of the pass).
    sizes = [len(c) for c in chunks[:-1]]
    assert sizes == sorted(sizes)


def test_ramped_starts_small_and_doubles_to_the_chunk() -> None:
    assert [len(c) for c in ramped(list(range(100)), 16, 8)] == [2, 4, 8, 16, 16, 16, 16, 16, 6]
    assert [len(c) for c in ramped(list(range(10)), 4, 1)] == [4, 4, 2]  # first=1: no ramp
    assert [len(c) for c in ramped(list(range(3)), 1, 8)] == [1, 1, 1]


def test_auto_prefetch_fills_the_byte_budget_per_rank() -> None:
    per_step = 128 * row_bytes(32)  # global batch 256 over 2 ranks
    steps = auto_prefetch(256, 2, 32)
    assert steps * per_step <= AUTO_PREFETCH_BYTES < (steps + 1) * per_step
    assert auto_prefetch(256, 4, 32) >= 2 * steps - 1  # a rank's share halves: twice the steps
    # Rows so large that one step is more than the budget: still one request alive and one loading.
    assert auto_prefetch(4096, 1, 1_000_000) == 2
