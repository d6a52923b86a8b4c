"""Cross-request dynamic batching: the loop that turns one model's fair queue into forward passes.

Every request's pairs join one queue (`fair_queue`, which decides what each batch holds). On a CPU, a short
wait (`batch_wait_ms`) after the queue wakes up gathers concurrent requests into the same batch. Forward
passes run in one worker thread: the event loop never blocks on the model. On a GPU, which runs a pass
asynchronously, the next batch is formed and queued behind the running one before the running one's logits
are collected, so the device does not sit idle while the host pads, lays out and queues a batch (TEI's router
works the same way); a CPU computes a pass at launch, and each batch is delivered before the next is formed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

from rerankd.backends.base import Batch, Pair, PassSeconds, PendingLogits
from rerankd.engine.fair_queue import FairQueue, QueuedBatch, QueuedRequest, admits, deliver
from rerankd.settings import RuntimeSettings

logger = logging.getLogger(__name__)

LaunchFn = Callable[[Batch], PendingLogits]


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

    @property
    def queued_pairs(self) -> int:
        """Pairs waiting for a batch, and those of admitted requests still being tokenized."""
        return self._queue.queued_pairs + sum(admission.pairs for admission in self._admitted)

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
        self._wakeup.set()
        try:
            return await asyncio.shield(waiter.done)
        except asyncio.CancelledError:
            self._withdraw(request)
            raise

    def _ensure_running(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the batching loop on the caller's event loop (again, if a previous loop has ended)."""
        if loop is not self._loop:
            self._loop = loop
            self._wakeup = asyncio.Event()
            self._queue.clear()
            self._waiters = {}
            self._loop_task = None
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = loop.create_task(self._run(), name="batch-scheduler")

    def stop(self) -> None:
        """Cancel the batching loop (queued requests are cancelled with it); call from its event loop."""
        if self._loop_task is not None:
            self._loop_task.cancel()
        self._queue.clear()
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
            if not self._queue:
                if in_flight is not None:
                    await self._collect(in_flight)
                    in_flight = None
                    continue
                self._wakeup.clear()
                await self._wakeup.wait()
                if self._wait_seconds:
                    await asyncio.sleep(self._wait_seconds)
            batch = self._queue.next_batch(self._budget, self._max_pairs, self._pass_seconds)
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
        pairs = Batch([request.pairs[index] for request, index in batch])
        started = time.perf_counter()
        for request, _ in batch:
            waiter = self._waiters.get(request)
            if waiter is not None:
                waiter.timing.first_batch = waiter.timing.first_batch or started
        loop = asyncio.get_running_loop()
        try:
            logits = await loop.run_in_executor(self._executor, self._launch_fn, pairs)
        except Exception as error:  # a failed forward fails only the requests in this batch
            self._fail_batch(batch, error)
            return None
        return _LaunchedBatch(batch, started, logits, pairs.lengths)

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
            lengths = launched.lengths
            seconds = time.perf_counter() - launched.started
            self._on_batch(BatchStats(len(lengths), sum(lengths), len(lengths) * max(lengths), seconds))
        finished = time.perf_counter()
        for request in deliver(launched.batch, logits):
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
