"""The queue of one model's pairs, and the policy that forms each batch from it: plain data, no event loop.

Each batch is packed under a padded-token budget (batch size × longest pair ≤ the budget) and a pair cap,
each request giving its pairs in length order so that padding stays low. Requests share the model by fair
queueing on a virtual clock: the clock advances by 1/n for every pair served while n requests wait; a
request joins at the clock's time, and its finish tag is that time plus its number of pairs. The lowest
finish tag goes first, so a 10-document request that arrives while a 1,000-document one is queued fills the
very next batch and is done after it, instead of alternating pair by pair with the big one over several
batches. Requests whose finish tags are within one batch of the lowest (equal requests that arrived
together, say) are served together, shortest pair first across all of them: they finish together, as under
ideal fair sharing, and their batches pad less. A request is never overtaken forever: the clock keeps
advancing while others are served, so newcomers' tags eventually pass an old request's fixed one.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence, Sized
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from rerankd.backends.base import PassSeconds
from rerankd.engine.passes import cheapest_first_pass

# What the queue holds per pair: anything with a length (the engine's `Pair`s; plain lists in unit tests).
P = TypeVar("P", bound=Sized)


@dataclass(eq=False)
class QueuedRequest(Generic[P]):
    """A request's pairs waiting in the queue, shortest first, and the logits delivered so far."""

    arrival: int
    finish: float  # fair queueing's finish tag: the virtual clock when the request joined, plus its pairs
    pending: list[int]  # indices into pairs, sorted by length
    pairs: Sequence[P]
    logits: list[float] = field(init=False)
    remaining: int = field(init=False)  # pairs not yet scored (queued or in a running batch)

    def __post_init__(self) -> None:
        self.logits = [0.0] * len(self.pairs)
        self.remaining = len(self.pending)

    @property
    def next_length(self) -> int:
        """Tokens of the shortest pair still waiting."""
        return len(self.pairs[self.pending[0]])

    def pairs_per_batch(self, budget: int, max_pairs: int) -> int:
        """How many of its longest waiting pair fit one batch: a batch's worth of this request's pairs."""
        longest = len(self.pairs[self.pending[-1]])
        return max(1, min(max_pairs, budget // longest))


# A formed batch: which request each pair comes from, and the pair's index in it.
QueuedBatch = list[tuple[QueuedRequest[P], int]]


class FairQueue(Generic[P]):
    """The waiting requests of one model and the fair-queueing clock."""

    def __init__(self) -> None:
        self._requests: list[QueuedRequest[P]] = []
        self._arrivals = itertools.count()
        self._clock = 0.0  # virtual time of fair queueing

    @property
    def queued_pairs(self) -> int:
        return sum(len(request.pending) for request in self._requests)

    @property
    def waiting_requests(self) -> int:
        return len(self._requests)

    def __bool__(self) -> bool:
        return bool(self._requests)

    def add(self, pairs: Sequence[P]) -> QueuedRequest[P]:
        """Queue a request's pairs (none queued for an empty one)."""
        order = sorted(range(len(pairs)), key=lambda index: len(pairs[index]))
        request = QueuedRequest(next(self._arrivals), self._clock + len(order), order, pairs)
        if order:
            self._requests.append(request)
        return request

    def withdraw(self, request: QueuedRequest[P]) -> bool:
        """Drop a request's waiting pairs; False when none were waiting."""
        if request not in self._requests:
            return False
        self._requests.remove(request)
        return True

    def take(self, request: QueuedRequest[P]) -> QueuedBatch[P]:
        """All of a waiting request's pairs as one batch, shortest first, out of turn (the scheduler's
        handover: the caller has checked they fit one); the clock advances as if it had served them."""
        self._clock += len(request.pending) / len(self._requests)
        batch = [(request, index) for index in request.pending]
        request.pending = []
        self._requests.remove(request)
        return batch

    def clear(self) -> list[QueuedRequest[P]]:
        """Empty the queue, returning what waited."""
        requests, self._requests = self._requests, []
        return requests

    def next_batch(
        self, budget: int, max_pairs: int, pass_seconds: PassSeconds | None = None
    ) -> QueuedBatch[P]:
        """Fill a batch pair by pair. Requests whose finish tags are within one batch of the lowest (as many
        of its longest pair as fit the budget and the pair cap) are served together, shortest pair first
        across all of them; then the others, lowest finish tag first, each giving its shortest pair. A
        request whose next pair would pass the token budget sits this batch out. Where `pass_seconds` times
        the backend's passes, only the batch's cheapest first pass is taken (`cheapest_first_pass`)."""
        batch: QueuedBatch[P] = []
        clock_steps: list[float] = []
        longest = 0
        candidates = [request for request in self._requests if request.pending]
        waiting = len(candidates)
        lowest = min(candidates, key=lambda request: request.finish, default=None)
        together = 0.0
        if lowest is not None:
            together = lowest.finish + lowest.pairs_per_batch(budget, max_pairs)

        def priority(request: QueuedRequest[P]) -> tuple[float, ...]:
            if request.finish <= together:
                return (0, request.next_length, request.finish, request.arrival)
            return (1, request.finish, request.arrival)

        while candidates and len(batch) < max_pairs:
            request = min(candidates, key=priority)
            length = request.next_length
            if batch and (len(batch) + 1) * max(longest, length) > budget:
                candidates.remove(request)
                continue
            batch.append((request, request.pending.pop(0)))
            clock_steps.append(1 / waiting)
            longest = max(longest, length)
            if not request.pending:
                candidates.remove(request)
                waiting -= 1
        if pass_seconds is not None and batch:
            lengths = [len(request.pairs[index]) for request, index in batch]
            kept = cheapest_first_pass(lengths, pass_seconds)
            for request, index in reversed(batch[kept:]):  # back to the front of their queues, in order
                request.pending.insert(0, index)
            batch, clock_steps = batch[:kept], clock_steps[:kept]
        self._clock += sum(clock_steps)
        self._requests = [request for request in self._requests if request.pending]
        return batch


def admits(pairs: int, queued: int, waiting: int, limit: int) -> bool:
    """Whether a request of `pairs` joins a queue holding `queued` pairs of `waiting` requests under `limit`:
    when it fits, when the queue is idle (so a request larger than the limit is not refused forever), or when
    it is within its fair share of the limit, the limit over the requests waiting with it. The last keeps one
    huge request from getting every small one that arrives behind it refused; the queue may then pass the
    limit, by at most a share per request."""
    return queued + pairs <= limit or waiting == 0 or pairs <= limit // (waiting + 1)


def deliver(batch: QueuedBatch[P], logits: Sequence[float]) -> list[QueuedRequest[P]]:
    """Record a batch's logits with their requests; the requests this completed."""
    completed = []
    for (request, index), logit in zip(batch, logits, strict=True):
        request.logits[index] = logit
        request.remaining -= 1
        if request.remaining == 0:
            completed.append(request)
    return completed
