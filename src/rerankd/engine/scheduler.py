"""Cross-request dynamic batching: one queue of pairs per model, one forward pass running at a time.

Every request's pairs join one queue. Each batch is packed under a padded-token budget (batch size × longest
pair ≤ `max_batch_tokens`) and a pair cap, each request giving its pairs in length order so that padding stays
low. Requests share the model by fair queueing on a virtual clock: the clock advances by 1/n for every pair
served while n requests wait; a request joins at the clock's time, and its finish tag is that time plus its
number of pairs. The lowest finish tag goes first, so a 10-document request that arrives while a
1,000-document one is queued fills the very next batch and is done after it, instead of alternating pair by
pair with the big one over several batches. Requests whose finish tags are within one batch of the lowest
(equal requests that arrived together, say) are served together, shortest pair first across all of them:
they finish together, as under ideal fair sharing, and their batches pad less (8 requests of 64 MS MARCO
passages: 8% fewer padded tokens, 16% fewer batches, 10% more pairs/s than one request after another). A
request is never overtaken forever: the clock keeps advancing while others are served, so newcomers' tags
eventually pass an old request's fixed one. On a CPU, a short wait (`batch_wait_ms`) after the queue wakes up
gathers concurrent requests into the same batch. Forward passes run in one worker thread: the event loop never
blocks on the model. On a GPU, which runs a pass asynchronously, the next batch is formed and queued behind
the running one before the running one's logits are collected, so the device does not sit idle while the host
pads, lays out and queues a batch (TEI's router works the same way); a CPU computes a pass at launch, and each
batch is delivered before the next is formed. Where the backend has timed its passes (CUDA graphs, one per
batch shape), a formed batch whose pairs differ much in length is cut into the passes that take the least
time (`cheapest_first_pass`): a GPU's budget fits a whole request of short and long pairs in one pass, all
padded to the longest.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace

from rerankd.backends.base import PassSeconds, PendingLogits

logger = logging.getLogger(__name__)

LaunchFn = Callable[[Sequence[Sequence[int]]], PendingLogits]


@dataclass(frozen=True)
class BatchStats:
    """One forward pass, for metrics."""

    pairs: int
    tokens: int  # real tokens
    padded_tokens: int  # batch size x longest pair
    seconds: float  # from its launch until its logits were on the host


BatchObserver = Callable[[BatchStats], None]


@dataclass
class RequestTiming:
    """Filled in by the scheduler: when a request's first pair went into a batch, and its last came out."""

    submitted: float = 0.0
    first_batch: float | None = None
    finished: float | None = None

    @property
    def queue_seconds(self) -> float:
        return (self.first_batch or self.submitted) - self.submitted

    @property
    def inference_seconds(self) -> float:
        return (self.finished or self.submitted) - (self.first_batch or self.submitted)


# Padded tokens per forward pass when the user sets none. Measured with `rerankd bench`-style sweeps on the
# 2-core CPU: base geometry, MS MARCO pairs, fp32 — 512/1024 tokens: 9.0/8.5 pairs/s, 4096: 5.6, 8192: 5.0
# (xsmall peaks at 1024: 27 pairs/s vs 16.5 at 8192). Big CPU batches spill the caches; a GPU wants them big.
DEFAULT_BATCH_TOKENS = {"cpu": 1024, "cuda": 16384}
# How long an idle queue waits for concurrent requests. A CPU pass of a few requests' pairs takes long
# enough that gathering them first pays. A GPU pass takes milliseconds, and concurrent requests gather on
# their own while one runs (the next batch is formed behind it), so a wait only adds to each request's time:
# one client on an H200 (base, fp16, CUDA graphs, 64 passages) 2,882 pairs/s with 2 ms, 3,135 with none.
DEFAULT_BATCH_WAIT_MS = {"cpu": 2.0, "cuda": 0.0}


@dataclass(frozen=True)
class BatchLimits:
    max_batch_tokens: int | None = None  # padded tokens per forward pass (batch size x longest pair)
    max_batch_pairs: int = 64
    batch_wait_ms: float | None = None
    max_queued_pairs: int | None = None  # admission limit: a request that would pass it is refused

    def for_device(self, device_type: str) -> BatchLimits:
        """These limits with the token budget and the wait filled in for `device_type` where the user set
        none."""
        known = device_type if device_type in DEFAULT_BATCH_TOKENS else "cpu"
        tokens = DEFAULT_BATCH_TOKENS[known] if self.max_batch_tokens is None else self.max_batch_tokens
        wait = DEFAULT_BATCH_WAIT_MS[known] if self.batch_wait_ms is None else self.batch_wait_ms
        return replace(self, max_batch_tokens=tokens, batch_wait_ms=wait)


# Pairs whose lengths round up to the same multiple of this are never split into different passes: a CUDA
# graph's bucket (cuda_graphs.LENGTH_STEP), and few enough cut points to weigh them all at every batch.
CUT_TOKENS = 16


def cheapest_first_pass(lengths: Sequence[int], pass_seconds: PassSeconds) -> int:
    """How many of a formed batch's pairs (`lengths`, in the order it took them) to run now, so that the batch
    runs as the sequence of passes that takes the least device time, by `pass_seconds(pairs, longest)`. One
    padded pass of 64 MS MARCO passages on an H200 (base, fp16) takes 11.9 ms; three passes of 32, 24 and 8
    of them, cut by length, 8.4 ms. Only the first pass is taken: the rest go back to the queue, to be
    weighed again with whatever arrives meanwhile. Cuts fall between runs of pairs of one length class
    (`CUT_TOKENS`); over the k runs this is the O(k²) dynamic program of the best split of a sequence."""
    runs: list[tuple[int, int]] = []  # (pairs, longest) of each run of equal length class
    for length in lengths:
        if runs and -(-length // CUT_TOKENS) == -(-runs[-1][1] // CUT_TOKENS):
            runs[-1] = (runs[-1][0] + 1, max(runs[-1][1], length))
        else:
            runs.append((1, length))
    # cheapest[i]: least time to run runs i.. ; first_cut[i]: where the first of those passes ends.
    cheapest = [0.0] * (len(runs) + 1)
    first_cut = [len(runs)] * (len(runs) + 1)
    for start in range(len(runs) - 1, -1, -1):
        pairs, longest, best = 0, 0, float("inf")
        for end in range(start + 1, len(runs) + 1):
            pairs += runs[end - 1][0]
            longest = max(longest, runs[end - 1][1])
            seconds = pass_seconds(pairs, longest) + cheapest[end]
            if seconds < best:
                best, first_cut[start] = seconds, end
        cheapest[start] = best
    return sum(pairs for pairs, _ in runs[: first_cut[0]])


class QueueFullError(RuntimeError):
    """The queue cannot take a request's pairs now; the client should retry shortly."""

    def __init__(self, pairs: int, queued: int, limit: int) -> None:
        super().__init__(
            f"server busy: {queued} pairs queued, and {pairs} more would pass the limit of {limit} "
            "(--max-queued-pairs); retry shortly"
        )


@dataclass(eq=False)
class _Request:
    """A request's pairs waiting in the queue, shortest first, and where their logits go."""

    arrival: int
    finish: float  # fair queueing's finish tag: the virtual clock when the request joined, plus its pairs
    pending: list[int]  # indices into token_ids, sorted by length
    token_ids: Sequence[Sequence[int]]
    logits: list[float]
    done: asyncio.Future[list[float]]
    timing: RequestTiming
    remaining: int = field(init=False)

    def __post_init__(self) -> None:
        self.remaining = len(self.pending)

    @property
    def next_length(self) -> int:
        """Tokens of the shortest pair still waiting."""
        return len(self.token_ids[self.pending[0]])

    def pairs_per_batch(self, budget: int, max_pairs: int) -> int:
        """How many of its longest waiting pair fit one batch: a batch's worth of this request's pairs."""
        longest = len(self.token_ids[self.pending[-1]])
        return max(1, min(max_pairs, budget // longest))


@dataclass(frozen=True)
class _LaunchedBatch:
    batch: list[tuple[_Request, int]]
    started: float
    logits: PendingLogits


class BatchScheduler:
    """Owns the queue and the loop that turns it into forward passes for one model."""

    def __init__(
        self,
        launch: LaunchFn,
        executor: Executor,
        limits: BatchLimits,
        on_batch: BatchObserver | None = None,
        pass_seconds: PassSeconds | None = None,
    ) -> None:
        if limits.max_batch_tokens is None or limits.batch_wait_ms is None:
            raise ValueError("resolve the token budget and the wait first (BatchLimits.for_device)")
        self._launch_fn = launch
        self._on_batch = on_batch
        self._pass_seconds = pass_seconds
        self._executor = executor
        self._limits = limits
        self._requests: list[_Request] = []
        self._arrivals = itertools.count()
        self._clock = 0.0  # virtual time of fair queueing
        self._wakeup = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def queued_pairs(self) -> int:
        return sum(len(request.pending) for request in self._requests)

    async def submit(
        self, token_ids: Sequence[Sequence[int]], timing: RequestTiming | None = None
    ) -> list[float]:
        """Logits for every sequence, in input order; `timing`, when given, is filled in. Cancelling the
        caller drops its queued pairs. Raises `QueueFullError` when taking them would pass
        `max_queued_pairs` (an empty queue takes any request, so a request larger than the limit is not
        refused forever)."""
        loop = asyncio.get_running_loop()
        self._ensure_running(loop)
        limit = self._limits.max_queued_pairs
        queued = self.queued_pairs
        if limit is not None and queued and queued + len(token_ids) > limit:
            raise QueueFullError(len(token_ids), queued, limit)
        order = sorted(range(len(token_ids)), key=lambda index: len(token_ids[index]))
        timing = timing or RequestTiming()
        timing.submitted = time.perf_counter()
        request = _Request(
            next(self._arrivals),
            self._clock + len(order),
            order,
            token_ids,
            [0.0] * len(token_ids),
            loop.create_future(),
            timing,
        )
        if not order:
            return []
        self._requests.append(request)
        self._wakeup.set()
        try:
            return await asyncio.shield(request.done)
        except asyncio.CancelledError:
            self._withdraw(request)
            raise

    def _ensure_running(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the batching loop on the caller's event loop (again, if a previous loop has ended)."""
        if loop is not self._loop:
            self._loop = loop
            self._wakeup = asyncio.Event()
            self._requests = []
            self._loop_task = None
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = loop.create_task(self._run(), name="batch-scheduler")

    def stop(self) -> None:
        """Cancel the batching loop (queued requests are cancelled with it); call from its event loop."""
        if self._loop_task is not None:
            self._loop_task.cancel()
        for request in self._requests:
            request.done.cancel()
        self._requests = []

    def _withdraw(self, request: _Request) -> None:
        if request in self._requests:
            self._requests.remove(request)
            logger.debug("dropped %d queued pairs of a cancelled request", len(request.pending))

    async def _run(self) -> None:
        """Form, launch and deliver batches. A batch whose logits are not ready at launch (an asynchronous
        device) stays in flight while the next batch is formed and launched behind it, so the device never
        waits for the host between batches; it is then collected before anything else is launched."""
        in_flight: _LaunchedBatch | None = None
        while True:
            if not self._requests:
                if in_flight is not None:
                    await self._collect(in_flight)
                    in_flight = None
                    continue
                self._wakeup.clear()
                await self._wakeup.wait()
                if self._limits.batch_wait_ms:
                    await asyncio.sleep(self._limits.batch_wait_ms / 1000)
            batch = self._next_batch()
            if not batch:
                continue
            launched = await self._launch(batch)
            if in_flight is not None:
                await self._collect(in_flight)
                in_flight = None
            if launched is not None and launched.logits.ready:
                await self._collect(launched)
            else:
                in_flight = launched

    async def _launch(self, batch: list[tuple[_Request, int]]) -> _LaunchedBatch | None:
        """Start the batch's forward pass; None (its requests failed) when that raises."""
        sequences = [request.token_ids[index] for request, index in batch]
        started = time.perf_counter()
        for request, _ in batch:
            request.timing.first_batch = request.timing.first_batch or started
        loop = asyncio.get_running_loop()
        try:
            logits = await loop.run_in_executor(self._executor, self._launch_fn, sequences)
        except Exception as error:  # a failed forward fails only the requests in this batch
            self._fail_batch(batch, error)
            return None
        return _LaunchedBatch(batch, started, logits)

    async def _collect(self, launched: _LaunchedBatch) -> None:
        """Wait for a launched batch's logits (off the event loop when the device still runs) and deliver."""
        try:
            if launched.logits.ready:
                logits = launched.logits.result()
            else:
                loop = asyncio.get_running_loop()
                logits = await loop.run_in_executor(self._executor, launched.logits.result)
        except Exception as error:  # an asynchronous device reports a failed pass when it is collected
            self._fail_batch(launched.batch, error)
            return
        if self._on_batch is not None:
            lengths = [len(request.token_ids[index]) for request, index in launched.batch]
            seconds = time.perf_counter() - launched.started
            self._on_batch(BatchStats(len(lengths), sum(lengths), len(lengths) * max(lengths), seconds))
        self._deliver(launched.batch, logits)

    def _next_batch(self) -> list[tuple[_Request, int]]:
        """Fill a batch pair by pair. Requests whose finish tags are within one batch of the lowest (as many
        of its longest pair as fit the budget and the pair cap) are served together, shortest pair first
        across all of them; then the others, lowest finish tag first, each giving its shortest pair. A
        request whose next pair would pass the token budget sits this batch out."""
        limits = self._limits
        budget = limits.max_batch_tokens or 0
        batch: list[tuple[_Request, int]] = []
        clock_steps: list[float] = []
        longest = 0
        candidates = [request for request in self._requests if request.pending]
        waiting = len(candidates)
        lowest = min(candidates, key=lambda request: request.finish, default=None)
        together = 0.0
        if lowest is not None:
            together = lowest.finish + lowest.pairs_per_batch(budget, limits.max_batch_pairs)

        def priority(request: _Request) -> tuple[float, ...]:
            if request.finish <= together:
                return (0, request.next_length, request.finish, request.arrival)
            return (1, request.finish, request.arrival)

        while candidates and len(batch) < limits.max_batch_pairs:
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
        if self._pass_seconds is not None and batch:
            lengths = [len(request.token_ids[index]) for request, index in batch]
            kept = cheapest_first_pass(lengths, self._pass_seconds)
            for request, index in reversed(batch[kept:]):  # back to the front of their queues, in order
                request.pending.insert(0, index)
            batch, clock_steps = batch[:kept], clock_steps[:kept]
        self._clock += sum(clock_steps)
        self._requests = [request for request in self._requests if request.pending]
        return batch

    def _deliver(self, batch: list[tuple[_Request, int]], logits: list[float]) -> None:
        for (request, index), logit in zip(batch, logits, strict=True):
            request.logits[index] = logit
            request.remaining -= 1
            if request.remaining == 0 and not request.done.done():
                request.timing.finished = time.perf_counter()
                request.done.set_result(request.logits)

    def _fail_batch(self, batch: list[tuple[_Request, int]], error: Exception) -> None:
        logger.error("forward pass failed for a batch of %d pairs", len(batch), exc_info=error)
        for request in {request for request, _ in batch}:
            self._withdraw(request)
            if not request.done.done():
                request.done.set_exception(error)
