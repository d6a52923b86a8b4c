"""Cross-request dynamic batching: the loop that turns one model's fair queue into forward passes.

Every request's pairs join one queue (`fair_queue`, which decides what each batch holds). On a CPU, a short
wait (`batch_wait_ms`) after the queue wakes up gathers concurrent requests into the same batch. Forward
passes run in one worker thread: the event loop never blocks on the model. On a GPU, which runs a pass
asynchronously, the next batch is formed and queued behind the running one before the running one's logits
are collected, so the device does not sit idle while the host pads, lays out and queues a batch (TEI's router
works the same way); a CPU computes a pass at launch, and each batch is delivered before the next is formed.

A CPU pass of a full batch takes long (a third of a second for 1,024 tokens of xsmall on two AVX2 cores), and
a short request arriving just after it starts would wait for all of it. So a request that fits one batch and
that fair queueing puts before every request in the running batch (a lower finish tag) is taken out of the
queue and handed to the running pass, which runs it whole at its next step boundary (`BetweenSteps`: the
torch backends call it after each projection, norm, attention product and layer) and then goes on: the short
request waits for one step instead of a pass, and no long request loses its place or its work. A backend that
runs passes whole (llama.cpp) gets the handed-over batch as its very next pass, alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

from rerankd.backends.base import Batch, BetweenSteps, Pair, PassSeconds, PendingLogits
from rerankd.engine.fair_queue import FairQueue, QueuedBatch, QueuedRequest, admits, deliver
from rerankd.settings import RuntimeSettings

logger = logging.getLogger(__name__)

LaunchFn = Callable[[Batch, BetweenSteps | None], PendingLogits]


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


class QueueFullError(RuntimeError):
    """The queue cannot take a request's pairs now; the client should retry shortly."""

    def __init__(self, pairs: int, queued: int, waiting: int, limit: int) -> None:
        super().__init__(
            f"server busy: {queued} pairs of {waiting} requests queued, and {pairs} more would pass the "
            f"limit of {limit} (--max-queued-pairs) and this request's fair share of it; retry shortly"
        )


@dataclass(eq=False)
class Admission:
    """A request's place in the queue, held from admission (before tokenizing) until its pairs are queued:
    its pairs count against `--max-queued-pairs` meanwhile."""

    pairs: int


@dataclass(frozen=True)
class _Waiter:
    """Where a queued request's logits go."""

    done: asyncio.Future[list[float]]
    timing: RequestTiming


def _pairs_of(batch: QueuedBatch[Pair]) -> Batch:
    """The pairs a formed batch runs, in its order."""
    return Batch([request.pairs[index] for request, index in batch])


@dataclass(eq=False)
class _Handover:
    """A short request's pairs, taken from the queue for the running pass to run at a step boundary; whoever
    claims it first (that pass's thread, or the event loop once the pass is over) runs it."""

    batch: QueuedBatch[Pair]
    pairs: Batch = field(init=False)
    claimed: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.pairs = _pairs_of(self.batch)

    def claim(self) -> bool:
        with self._lock:
            claimed, self.claimed = self.claimed, True
            return not claimed


@dataclass(frozen=True)
class _LaunchedBatch:
    batch: QueuedBatch[Pair]
    started: float
    logits: PendingLogits
    lengths: list[int] = field(default_factory=list)


class BatchScheduler:
    """Owns the queue and the loop that turns it into forward passes for one model, within the batching
    limits of `settings` (resolved for the model's device)."""

    def __init__(
        self,
        launch: LaunchFn,
        executor: Executor,
        settings: RuntimeSettings,
        on_batch: BatchObserver | None = None,
        pass_seconds: PassSeconds | None = None,
    ) -> None:
        self._launch_fn = launch
        self._on_batch = on_batch
        self._pass_seconds = pass_seconds
        self._executor = executor
        self._budget = settings.batch_tokens
        self._wait_seconds = settings.batch_wait_seconds
        self._max_pairs = settings.max_batch_pairs
        self._max_queued = settings.max_queued_pairs
        self._queue: FairQueue[Pair] = FairQueue()
        self._admitted: set[Admission] = set()
        self._waiters: dict[QueuedRequest[Pair], _Waiter] = {}
        self._wakeup = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._running: QueuedBatch[Pair] | None = None  # the batch whose launch runs on the forward thread
        self._handover: _Handover | None = None

    @property
    def queued_pairs(self) -> int:
        """Pairs waiting for a batch (a handed-over one included), and those of admitted requests still being
        tokenized."""
        handed_over = 0 if self._handover is None else len(self._handover.batch)
        return self._queue.queued_pairs + handed_over + sum(admission.pairs for admission in self._admitted)

    def admit(self, pairs: int) -> Admission:
        """Hold a place for a request of `pairs` before any work is spent on it; raises `QueueFullError`
        unless the queue admits it (`fair_queue.admits`). `release` it if the request goes no further."""
        if self._max_queued is not None:
            queued = self.queued_pairs
            waiting = self._queue.waiting_requests + len(self._admitted)
            if not admits(pairs, queued, waiting, self._max_queued):
                raise QueueFullError(pairs, queued, waiting, self._max_queued)
        admission = Admission(pairs)
        self._admitted.add(admission)
        return admission

    def release(self, admission: Admission) -> None:
        self._admitted.discard(admission)

    async def submit(
        self, pairs: Sequence[Pair], timing: RequestTiming | None = None, admission: Admission | None = None
    ) -> list[float]:
        """Logits for every pair, in input order; `timing`, when given, is filled in. Cancelling the
        caller drops its queued pairs. The request takes its `admission`'s place, which must hold at least
        its pairs (else it is admitted again for all of them); without one it is admitted here. Raises
        `QueueFullError` when it is not admitted."""
        loop = asyncio.get_running_loop()
        self._ensure_running(loop)
        if admission is None or len(pairs) > admission.pairs:
            if admission is not None:
                self.release(admission)
            admission = self.admit(len(pairs))
        self.release(admission)
        timing = timing or RequestTiming()
        timing.submitted = time.perf_counter()
        if not pairs:
            return []
        request = self._queue.add(pairs)
        waiter = _Waiter(loop.create_future(), timing)
        self._waiters[request] = waiter
        self._hand_over_if_short(request)
        self._wakeup.set()
        try:
            return await asyncio.shield(waiter.done)
        except asyncio.CancelledError:
            self._withdraw(request)
            raise

    def _hand_over_if_short(self, request: QueuedRequest[Pair]) -> None:
        """Hand `request` to the running pass when it fits one batch and goes before every request in that
        pass by fair queueing (one handover at a time)."""
        running = self._running
        if running is None or self._handover is not None:
            return
        if len(request.pending) > request.pairs_per_batch(self._budget, self._max_pairs):
            return
        if request.finish >= min(queued.finish for queued, _ in running):
            return
        self._handover = _Handover(self._queue.take(request))

    def _between_steps(self) -> None:
        """Run by the running pass after each step, on the forward thread: runs a handed-over batch (its own
        pass, which nothing interrupts) and posts its logits, or its error, to the event loop."""
        handover, loop = self._handover, self._loop
        if handover is None or loop is None or not handover.claim():
            return
        started = time.perf_counter()
        try:
            outcome: list[float] | Exception = self._launch_fn(handover.pairs, None).result()
        except Exception as error:  # fails only the handed-over requests, as a failed batch would
            outcome = error
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits for these logits
            loop.call_soon_threadsafe(self._handed_over, handover, started, outcome)

    def _handed_over(self, handover: _Handover, started: float, outcome: list[float] | Exception) -> None:
        if self._handover is handover:
            self._handover = None
        self._mark_started(handover.batch, started)
        if isinstance(outcome, Exception):
            self._fail_batch(handover.batch, outcome)
        else:
            self._deliver(handover.batch, started, handover.pairs.lengths, outcome)

    def _next_batch(self) -> QueuedBatch[Pair]:
        """A handover no pass has run yet, else the queue's next batch."""
        handover = self._handover
        if handover is not None and handover.claim():
            self._handover = None
            return handover.batch
        return self._queue.next_batch(self._budget, self._max_pairs, self._pass_seconds)

    def _ensure_running(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the batching loop on the caller's event loop (again, if a previous loop has ended)."""
        if loop is not self._loop:
            self._loop = loop
            self._wakeup = asyncio.Event()
            self._queue.clear()
            self._waiters = {}
            self._loop_task = None
            self._handover = None
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = loop.create_task(self._run(), name="batch-scheduler")

    def stop(self) -> None:
        """Cancel the batching loop (queued requests are cancelled with it); call from its event loop."""
        if self._loop_task is not None:
            self._loop_task.cancel()
        self._queue.clear()
        self._handover = None
        for waiter in self._waiters.values():
            waiter.done.cancel()
        self._waiters = {}

    def _withdraw(self, request: QueuedRequest[Pair]) -> None:
        self._waiters.pop(request, None)
        if self._queue.withdraw(request):
            logger.debug("dropped %d queued pairs of a cancelled request", len(request.pending))

    async def _run(self) -> None:
        """Form, launch and deliver batches. A batch whose logits are not ready at launch (an asynchronous
        device) stays in flight while the next batch is formed and launched behind it, so the device never
        waits for the host between batches; it is then collected before anything else is launched."""
        in_flight: _LaunchedBatch | None = None
        while True:
            if not self._queue and (self._handover is None or self._handover.claimed):
                if in_flight is not None:
                    await self._collect(in_flight)
                    in_flight = None
                    continue
                self._wakeup.clear()
                await self._wakeup.wait()
                if self._wait_seconds:
                    await asyncio.sleep(self._wait_seconds)
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

    async def _launch(self, batch: QueuedBatch[Pair]) -> _LaunchedBatch | None:
        """Start the batch's forward pass; None (its requests failed) when that raises."""
        pairs = _pairs_of(batch)
        started = time.perf_counter()
        self._mark_started(batch, started)
        loop = asyncio.get_running_loop()
        self._running = batch
        try:
            logits = await loop.run_in_executor(self._executor, self._launch_fn, pairs, self._between_steps)
        except Exception as error:  # a failed forward fails only the requests in this batch
            self._fail_batch(batch, error)
            return None
        finally:
            self._running = None
        return _LaunchedBatch(batch, started, logits, pairs.lengths)

    def _mark_started(self, batch: QueuedBatch[Pair], started: float) -> None:
        for request, _ in batch:
            waiter = self._waiters.get(request)
            if waiter is not None:
                waiter.timing.first_batch = waiter.timing.first_batch or started

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
        self._deliver(launched.batch, launched.started, launched.lengths, logits)

    def _deliver(
        self, batch: QueuedBatch[Pair], started: float, lengths: list[int], logits: list[float]
    ) -> None:
        """Record a pass (`started` at its launch, of pairs of `lengths`); complete the requests it ends."""
        finished = time.perf_counter()
        if self._on_batch is not None:
            padded = len(lengths) * max(lengths)
            self._on_batch(BatchStats(len(lengths), sum(lengths), padded, finished - started))
        for request in deliver(batch, logits):
            waiter = self._waiters.pop(request, None)
            if waiter is not None and not waiter.done.done():
                waiter.timing.finished = finished
                waiter.done.set_result(request.logits)

    def _fail_batch(self, batch: QueuedBatch[Pair], error: Exception) -> None:
        logger.error("forward pass failed for a batch of %d pairs", len(batch), exc_info=error)
        for request in {request for request, _ in batch}:
            waiter = self._waiters.get(request)
            self._withdraw(request)
            if waiter is not None and not waiter.done.done():
                waiter.done.set_exception(error)
