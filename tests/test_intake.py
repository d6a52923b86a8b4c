"""The bytes-in-flight budget that bounds the memory large request bodies can take at once."""

from __future__ import annotations

import asyncio

import pytest

from rerankd.api.intake import SMALL_BODY_BYTES, BodyBudget

pytestmark = [pytest.mark.hostile]


def test_large_bodies_share_the_budget_and_small_ones_always_pass() -> None:
    budget = BodyBudget(limit=10 * 2**20)
    assert budget.admit(8 * 2**20)
    assert not budget.admit(4 * 2**20)  # would pass the limit beside the first
    assert budget.admit(SMALL_BODY_BYTES)  # small: saves no memory to refuse
    budget.release(SMALL_BODY_BYTES)
    budget.release(8 * 2**20)
    assert budget.in_flight == 0
    assert budget.admit(30 * 2**20)  # alone, any body within --max-request-bytes gets through
    budget.grow(1024)  # a body without Content-Length is counted as it arrives
    assert budget.in_flight == 30 * 2**20 + 1024


def test_a_large_body_waits_for_room_then_is_refused() -> None:
    """Past the budget a body waits for room, unread: admitted when another body is released in time,
    refused when none is."""
    budget = BodyBudget(limit=10 * 2**20)

    async def wait_for_room() -> tuple[bool, bool]:
        assert budget.admit(8 * 2**20)
        waiting = asyncio.ensure_future(budget.reserve(4 * 2**20, wait=10))
        await asyncio.sleep(0)
        assert not waiting.done()
        budget.release(8 * 2**20)
        admitted = await asyncio.wait_for(waiting, timeout=5)
        refused = await budget.reserve(8 * 2**20, wait=0.05)  # beside the 4 MB one, none released
        return admitted, refused

    assert asyncio.run(wait_for_room()) == (True, False)
    assert budget.in_flight == 4 * 2**20
