"""The batch-forming policy on its own: plain lists of token ids in, batches out, no event loop or model."""

from __future__ import annotations

import pytest

from rerankd.engine.fair_queue import FairQueue, admits, deliver


def pairs_of(lengths: list[int]) -> list[list[int]]:
    return [[0] * length for length in lengths]


def test_a_batch_takes_pairs_shortest_first_within_the_budget_and_the_cap() -> None:
    queue = FairQueue()
    request = queue.add(pairs_of([30, 10, 20, 40]))
    first = queue.next_batch(budget=80, max_pairs=8)
    assert [index for _, index in first] == [1, 2]  # a third pair would pad three to 30 > 80
    assert queue.queued_pairs == 2
    assert [index for _, index in queue.next_batch(budget=80, max_pairs=8)] == [0, 3]
    assert not queue and request.remaining == 4  # nothing waits; nothing delivered yet
    assert queue.next_batch(budget=80, max_pairs=8) == []


def test_a_small_request_behind_a_big_one_fills_the_next_batch() -> None:
    queue = FairQueue()
    big = queue.add(pairs_of([10] * 100))
    queue.next_batch(budget=1000, max_pairs=4)
    small = queue.add(pairs_of([10] * 3))
    batch = queue.next_batch(budget=1000, max_pairs=4)
    assert [request for request, _ in batch] == [small, small, small, big]


def test_requests_that_arrive_together_share_batches_shortest_pair_first() -> None:
    queue = FairQueue()
    first, second = queue.add(pairs_of([50, 10])), queue.add(pairs_of([40, 20]))
    batch = queue.next_batch(budget=1000, max_pairs=2)
    assert batch == [(first, 1), (second, 1)]


def test_deliver_completes_a_request_once_every_pair_is_scored() -> None:
    queue = FairQueue()
    request = queue.add(pairs_of([3, 1, 2]))
    assert deliver(queue.next_batch(budget=6, max_pairs=2), [1.0, 2.0]) == []
    assert deliver(queue.next_batch(budget=6, max_pairs=2), [3.0]) == [request]
    assert request.logits == [3.0, 1.0, 2.0]


def test_a_withdrawn_request_leaves_the_queue() -> None:
    queue = FairQueue()
    doomed, kept = queue.add(pairs_of([5] * 4)), queue.add(pairs_of([5]))
    assert queue.withdraw(doomed) and not queue.withdraw(doomed)
    assert queue.next_batch(budget=100, max_pairs=8) == [(kept, 0)]


def test_where_passes_are_timed_only_the_cheapest_first_pass_is_taken() -> None:
    """Short and long pairs padded together cost more than two passes cut by length: the long ones go back
    to the front of the queue."""
    queue = FairQueue()
    request = queue.add(pairs_of([8, 8, 8, 200]))
    batch = queue.next_batch(budget=4096, max_pairs=8, pass_seconds=lambda pairs, longest: pairs * longest)
    assert [index for _, index in batch] == [0, 1, 2]
    assert request.pending == [3]


def test_an_empty_request_queues_nothing() -> None:
    queue = FairQueue()
    queue.add([])
    assert not queue and queue.queued_pairs == 0


@pytest.mark.parametrize(
    ("pairs", "queued", "waiting", "admitted"),
    [
        (5, 0, 0, True),  # fits
        (50, 0, 0, True),  # larger than the limit, but the queue is idle
        (3, 9, 1, True),  # fits beside what waits
        (4, 9, 1, True),  # past the limit, within its share: 10 // 2
        (6, 9, 1, False),  # past the limit and past its share
        (1, 1000, 1, True),  # one huge request waits: a small one still gets in
        (4, 1000, 2, False),  # 10 // 3 = 3 is the share of a third request
        (3, 1000, 2, True),
    ],
)
def test_a_request_is_admitted_when_it_fits_the_queue_is_idle_or_it_is_within_its_share(
    pairs: int, queued: int, waiting: int, admitted: bool
) -> None:
    assert admits(pairs, queued, waiting, limit=10) is admitted
