"""The cross-request batch scheduler, driven by recording launch functions in place of a model: one that
computes at launch like a CPU, and one whose logits stay pending until collected, like a GPU's.

Nothing here is ordered by sleeping: a test that needs a batch in flight waits until the forward function
has been entered, and one that needs a request queued yields to the event loop until it is."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest

from rerankd.backends.base import Batch, BetweenSteps, Pair, PassSeconds, PendingLogits, ReadyLogits
from rerankd.engine.passes import cheapest_first_pass
from rerankd.engine.scheduler import BatchScheduler, QueueFullError, RequestTiming
from rerankd.settings import RuntimeSettings


class RecordingForward:
    """Logit = sum of the ids (so results are checkable); records every batch; can be held or made to fail."""

    def __init__(self) -> None:
        self.batches: list[list[list[int]]] = []
        self.release = threading.Event()
        self.release.set()
        self.entered = threading.Event()  # set once a batch has reached the forward function
        self.fail_when = lambda batch: False

    def __call__(self, batch: Batch, between_steps: BetweenSteps | None = None) -> PendingLogits:
        """A pass of one layer: released, then `between_steps`, then the batch is recorded (so a batch run
        between its layers is recorded before it)."""
        self.entered.set()
        assert self.release.wait(timeout=10), "the test never released the forward pass"
        if between_steps is not None:
            between_steps()
        self.batches.append(batch.input_ids)
        if self.fail_when(batch.input_ids):
            raise RuntimeError("injected forward failure")
        return ReadyLogits(id_sums(batch.pairs))


def sequences(tag: int, lengths: Sequence[int]) -> list[Pair]:
    """Pairs whose first id tags the request and whose sum identifies them."""
    return [Pair([tag] + [index + 1] * (length - 1), length) for index, length in enumerate(lengths)]


def id_sums(pairs: Sequence[Pair]) -> list[float]:
    """The logits the recording launch functions give: each pair's sum of ids."""
    return [float(sum(pair.ids)) for pair in pairs]


class WholePassForward(RecordingForward):
    """Runs every pass whole, as llama.cpp does: never calls `between_steps`."""

    def __call__(self, batch: Batch, between_steps: BetweenSteps | None = None) -> PendingLogits:
        return super().__call__(batch)


@pytest.fixture
def forward() -> RecordingForward:
    return RecordingForward()


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, timeout=30))


async def held_in_forward(forward: RecordingForward) -> None:
    """Until the scheduler's worker thread has entered `forward` (where `release` holds it)."""
    entered = await asyncio.get_running_loop().run_in_executor(None, forward.entered.wait, 10)
    assert entered, "no batch reached the forward function"


async def until_queued(scheduler: BatchScheduler, pairs: int) -> None:
    """Yield to the event loop until `pairs` pairs wait in the queue: a request's task queues its pairs in
    its first turn on the loop."""
    for _ in range(100):
        if scheduler.queued_pairs == pairs:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"{scheduler.queued_pairs} pairs queued, expected {pairs}")


def make_scheduler(
    forward: RecordingForward, pass_seconds: PassSeconds | None = None, **limits
) -> tuple[BatchScheduler, ThreadPoolExecutor]:
    executor = ThreadPoolExecutor(max_workers=1)
    scheduler = BatchScheduler(
        forward, executor, RuntimeSettings(**limits).for_device("cpu"), pass_seconds=pass_seconds
    )
    return scheduler, executor


def test_results_come_back_in_input_order_within_budget_and_cap(forward: RecordingForward) -> None:
    scheduler, executor = make_scheduler(forward, max_batch_tokens=512, max_batch_pairs=4, batch_wait_ms=0)
    lengths = [5, 512, 40, 40, 300, 7, 128, 129, 1, 256, 90, 90, 90]
    pairs = sequences(1000, lengths)
    logits = run(scheduler.submit(pairs))
    executor.shutdown()
    assert logits == id_sums(pairs)
    for batch in forward.batches:
        assert len(batch) <= 4
        assert len(batch) == 1 or len(batch) * max(map(len, batch)) <= 512
    # Shortest first: padding stays low because batches never interleave lengths.
    flattened = [len(ids) for batch in forward.batches for ids in batch]
    assert flattened == sorted(flattened)
    assert scheduler.queued_pairs == 0


def test_concurrent_requests_share_a_batch(forward: RecordingForward) -> None:
    """Requests gathered in one turn of the event loop are all queued before the batching loop first runs."""
    scheduler, executor = make_scheduler(forward, max_batch_tokens=4096, max_batch_pairs=64, batch_wait_ms=0)

    async def three_clients():
        return await asyncio.gather(*(scheduler.submit(sequences(tag, [10, 12])) for tag in (100, 200, 300)))

    results = run(three_clients())
    executor.shutdown()
    assert len(forward.batches) == 1 and len(forward.batches[0]) == 6
    assert [len(result) for result in results] == [2, 2, 2]


def test_requests_that_arrive_together_are_packed_by_length_across_them(forward: RecordingForward) -> None:
    """Equal requests arriving together share batches by length: no batch pads a short pair to a long one."""
    scheduler, executor = make_scheduler(forward, max_batch_tokens=4096, max_batch_pairs=3, batch_wait_ms=0)

    async def three_clients():
        return await asyncio.gather(
            *(scheduler.submit(sequences(tag, [90, 10, 50])) for tag in (100, 200, 300))
        )

    results = run(three_clients())
    executor.shutdown()
    assert [sorted(map(len, batch)) for batch in forward.batches] == [[10] * 3, [50] * 3, [90] * 3]
    assert results == [id_sums(sequences(tag, [90, 10, 50])) for tag in (100, 200, 300)]


def small_beside_huge(
    scheduler: BatchScheduler, forward: RecordingForward, huge_lengths: list[int]
) -> list[float]:
    """Submit a huge request (tag 7) while the first batch is held, then a 6-pair one (tag 9) while the huge
    one is queued; the small request's logits once both are done."""

    async def huge_then_small():
        forward.release.clear()
        huge = asyncio.ensure_future(scheduler.submit(sequences(7, huge_lengths)))
        await held_in_forward(forward)
        queued = scheduler.queued_pairs
        small = asyncio.ensure_future(scheduler.submit(sequences(9, [30, 40, 50, 60, 70, 90])))
        await until_queued(scheduler, queued + 6)
        forward.release.set()
        small_logits = await small
        await huge
        return small_logits

    return run(huge_then_small())


def test_a_short_request_runs_between_the_layers_of_a_running_pass(forward: RecordingForward) -> None:
    """The small request arrives while the huge one's first batch runs; fair queueing puts it first, and it
    fits one batch: it is handed to the running pass, which runs it whole between two layers, then goes on."""
    scheduler, executor = make_scheduler(forward, max_batch_tokens=1024, max_batch_pairs=8, batch_wait_ms=0)
    small_logits = small_beside_huge(scheduler, forward, [100] * 400)
    executor.shutdown()
    assert small_logits == id_sums(sequences(9, [30, 40, 50, 60, 70, 90]))
    assert [ids[0] for ids in forward.batches[0]] == [9] * 6  # alone: not topped up by the huge request
    assert [ids[0] for ids in forward.batches[1]] == [7] * 8  # the held pass, finished after it
    assert len(forward.batches) == 1 + 400 // 8
    assert scheduler.queued_pairs == 0


def test_a_pass_run_whole_takes_the_short_request_next_and_alone() -> None:
    """A backend that runs passes whole (llama.cpp) never calls `between_steps`: the handed-over request is
    its very next pass, not topped up with the huge one's pairs."""
    forward = WholePassForward()
    scheduler, executor = make_scheduler(forward, max_batch_tokens=1024, max_batch_pairs=8, batch_wait_ms=0)
    assert len(small_beside_huge(scheduler, forward, [100] * 40)) == 6
    executor.shutdown()
    assert [[ids[0] for ids in batch] for batch in forward.batches[:3]] == [[7] * 8, [9] * 6, [7] * 8]


def test_what_is_not_handed_over_waits_for_the_running_pass(forward: RecordingForward) -> None:
    """A request larger than one batch, and one that fair queueing puts after the running batch's requests
    (an equal one that came later), wait in the queue as before."""
    scheduler, executor = make_scheduler(forward, max_batch_tokens=1024, max_batch_pairs=8, batch_wait_ms=0)

    async def newcomers_during_a_pass() -> None:
        forward.release.clear()
        first = asyncio.ensure_future(scheduler.submit(sequences(1, [100] * 4)))
        await held_in_forward(forward)
        larger = asyncio.ensure_future(scheduler.submit(sequences(2, [10] * 9)))  # past 8 pairs a batch
        equal = asyncio.ensure_future(scheduler.submit(sequences(3, [100] * 4)))  # tag 4 + 4 > 4
        await until_queued(scheduler, 13)
        forward.release.set()
        await asyncio.gather(first, larger, equal)

    run(newcomers_during_a_pass())
    executor.shutdown()
    assert [ids[0] for ids in forward.batches[0]] == [1] * 4  # nothing ran between its layers


def test_a_failing_handed_over_pass_fails_only_its_request(forward: RecordingForward) -> None:
    scheduler, executor = make_scheduler(forward, max_batch_tokens=1024, max_batch_pairs=8, batch_wait_ms=0)
    forward.fail_when = lambda batch: any(ids[0] == 66 for ids in batch)

    async def failing_short_request_during_a_pass() -> list[float]:
        forward.release.clear()
        long_request = asyncio.ensure_future(scheduler.submit(sequences(1, [100] * 20)))
        await held_in_forward(forward)
        doomed = asyncio.ensure_future(scheduler.submit(sequences(66, [10, 10])))
        await until_queued(scheduler, 12 + 2)
        forward.release.set()
        with pytest.raises(RuntimeError, match="injected"):
            await doomed
        return await long_request

    assert run(failing_short_request_during_a_pass()) == id_sums(sequences(1, [100] * 20))
    executor.shutdown()


def test_a_small_request_near_a_huge_ones_end_is_not_spread_over_its_batches() -> None:
    """Within one batch of the small request's finish tag means the pairs that fit the token budget, not the
    pair cap: a huge request 23 pairs behind (within the cap of 64, past the 11 of the small one's 90-token
    pairs that fit 1,024 tokens) is not mixed with it by length, which would push its longest pair a batch
    later. (Passes run whole here; the small request, queued while none runs, is not handed over.)"""
    forward = WholePassForward()
    scheduler, executor = make_scheduler(forward, max_batch_tokens=1024, max_batch_pairs=64, batch_wait_ms=0)

    async def small_queued_between_passes() -> list[float]:
        forward.release.clear()
        huge = asyncio.ensure_future(scheduler.submit(sequences(7, [20] * 60 + [100] * 20)))
        await held_in_forward(forward)
        filler = asyncio.ensure_future(
            scheduler.submit(sequences(8, [1000]))
        )  # handed over: the slot is taken
        await until_queued(scheduler, 29 + 1)
        small = asyncio.ensure_future(scheduler.submit(sequences(9, [30, 40, 50, 60, 70, 90])))
        await until_queued(scheduler, 29 + 1 + 6)
        forward.release.set()
        await asyncio.gather(huge, filler)
        return await small

    assert len(run(small_queued_between_passes())) == 6
    executor.shutdown()
    assert len(forward.batches[0]) == 51  # the held batch: 51 of the huge request's 60 20-token pairs
    assert [ids[0] for ids in forward.batches[1]] == [8]
    assert sum(ids[0] == 9 for ids in forward.batches[2]) == 6


def test_cancelled_request_drops_its_queued_pairs(forward: RecordingForward) -> None:
    scheduler, executor = make_scheduler(forward, max_batch_tokens=256, max_batch_pairs=2, batch_wait_ms=0)

    async def cancel_midway():
        forward.release.clear()
        doomed = asyncio.ensure_future(scheduler.submit(sequences(5, [10] * 20)))
        await held_in_forward(forward)
        doomed.cancel()
        forward.release.set()
        survivor = await scheduler.submit(sequences(6, [10]))
        return survivor

    survivor = run(cancel_midway())
    executor.shutdown()
    assert len(survivor) == 1
    tags = [ids[0] for batch in forward.batches for ids in batch]
    assert tags.count(5) <= 2  # at most the batch already in flight ran
    assert scheduler.queued_pairs == 0


def test_a_failing_forward_fails_only_its_batch(forward: RecordingForward) -> None:
    scheduler, executor = make_scheduler(forward, max_batch_tokens=4096, max_batch_pairs=64, batch_wait_ms=0)
    forward.fail_when = lambda batch: any(ids[0] == 66 for ids in batch)

    async def failing_then_fine():
        with pytest.raises(RuntimeError, match="injected"):
            await scheduler.submit(sequences(66, [4, 4]))
        return await scheduler.submit(sequences(1, [4, 5]))

    assert run(failing_then_fine()) == [4.0, 9.0]
    executor.shutdown()


def test_empty_submission_returns_at_once(forward: RecordingForward) -> None:
    scheduler, executor = make_scheduler(forward)
    assert run(scheduler.submit([])) == []
    executor.shutdown()
    assert forward.batches == []


def test_a_scheduler_needs_settings_resolved_for_a_device() -> None:
    with pytest.raises(ValueError, match="resolve the settings for a device first"):
        BatchScheduler(lambda ids, _: ReadyLogits([0.0] * len(ids)), ThreadPoolExecutor(1), RuntimeSettings())


def test_admission_refuses_what_would_pass_max_queued_pairs_beyond_its_fair_share(
    forward: RecordingForward,
) -> None:
    scheduler, executor = make_scheduler(
        forward, max_batch_tokens=64, max_batch_pairs=1, batch_wait_ms=0, max_queued_pairs=5
    )

    async def fill_then_overflow() -> list[list[float]]:
        forward.release.clear()
        first = asyncio.ensure_future(
            scheduler.submit(sequences(1, [4] * 20))
        )  # an idle queue takes any size
        await held_in_forward(forward)
        with pytest.raises(QueueFullError, match="max-queued-pairs"):
            await scheduler.submit(sequences(2, [4] * 3))  # past the limit and past 5 // 2, its share
        held = scheduler.admit(2)  # within its share: taken although the queue is past the limit
        with pytest.raises(QueueFullError, match="fair share"):
            scheduler.admit(2)  # a third request's share is 5 // 3 = 1
        scheduler.release(held)
        forward.release.set()
        await first
        return [await scheduler.submit(sequences(3, [4] * 5)), await scheduler.submit(sequences(4, [4]))]

    assert [len(logits) for logits in run(fill_then_overflow())] == [5, 1]
    executor.shutdown()
    assert all(ids[0] != 2 for batch in forward.batches for ids in batch)
    assert scheduler.queued_pairs == 0


class GatedForward:
    """Lets one batch through per `step()`, so a test can queue requests between batches."""

    def __init__(self) -> None:
        self.batches: list[list[list[int]]] = []
        self._gate = threading.Semaphore(0)
        self._entered = threading.Semaphore(0)

    def __call__(self, batch: Batch, between_steps: BetweenSteps | None = None) -> PendingLogits:
        self.batches.append(batch.input_ids)
        self._entered.release()
        self._gate.acquire(timeout=10)
        return ReadyLogits(id_sums(batch.pairs))

    async def entered(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._entered.acquire, True, 10)

    def step(self) -> None:
        self._gate.release()


def test_a_partly_served_request_is_not_overtaken_forever_by_new_ones() -> None:
    """Before every batch, two new requests arrive that alone could fill it, each with an earlier finish tag
    than the older, partly served request at first; the virtual clock still brings the old one's turn within
    the contested batches."""
    forward = GatedForward()
    executor = ThreadPoolExecutor(max_workers=1)
    limits = RuntimeSettings(max_batch_tokens=1024, max_batch_pairs=2, batch_wait_ms=0)
    scheduler = BatchScheduler(forward, executor, limits)

    async def old_request_amid_new_ones() -> None:
        old = asyncio.ensure_future(scheduler.submit(sequences(1, [4] * 6)))
        await forward.entered()  # the first batch: two of its pairs
        newcomers = []
        for round_index in range(10):
            tags = (100 + 2 * round_index, 101 + 2 * round_index)
            queued = scheduler.queued_pairs
            newcomers += [asyncio.ensure_future(scheduler.submit(sequences(tag, [4]))) for tag in tags]
            await until_queued(scheduler, queued + 2)
            forward.step()
            await forward.entered()
        for _ in range(20):
            forward.step()
        await asyncio.gather(old, *newcomers)

    run(old_request_amid_new_ones())
    executor.shutdown()
    old_pairs_in_contested_batches = sum(ids[0] == 1 for batch in forward.batches[1:11] for ids in batch)
    assert old_pairs_in_contested_batches >= 3


class QueuedDevice:
    """Stands in for an asynchronous device: a launch returns logits still pending, and a batch's logits come
    when they are collected. Records the order of launches and collections; can fail a batch at collection,
    where a GPU reports a failed pass."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []
        self.fail_when = lambda batch: False

    def __call__(self, batch: Batch, between_steps: BetweenSteps | None = None) -> PendingLogits:
        launched = sum(event == "launch" for event, _ in self.events)
        self.events.append(("launch", launched))
        return QueuedLogits(self, launched, batch.input_ids)


class QueuedLogits(PendingLogits):
    ready = False

    def __init__(self, device: QueuedDevice, index: int, batch: list[list[int]]) -> None:
        self.device, self.index, self.batch = device, index, batch

    def result(self) -> list[float]:
        self.device.events.append(("collect", self.index))
        if self.device.fail_when(self.batch):
            raise RuntimeError("injected device failure")
        return [float(sum(ids)) for ids in self.batch]


def gpu_limits(pairs: int) -> RuntimeSettings:
    """A small budget, and a GPU's defaults otherwise (no batch wait)."""
    return RuntimeSettings(max_batch_tokens=64, max_batch_pairs=pairs).for_device("cuda")


def test_on_an_asynchronous_device_the_next_batch_is_queued_before_the_running_one_is_collected() -> None:
    device = QueuedDevice()
    executor = ThreadPoolExecutor(max_workers=1)
    scheduler = BatchScheduler(device, executor, gpu_limits(pairs=2))
    pairs = sequences(4, [10, 11, 12, 13, 14, 15])
    assert run(scheduler.submit(pairs)) == id_sums(pairs)
    executor.shutdown()
    order = ["launch 0", "launch 1", "collect 0", "launch 2", "collect 1", "collect 2"]
    assert [f"{event} {index}" for event, index in device.events] == order


def first_two_requests_timings(launch) -> tuple[RequestTiming, RequestTiming]:
    """Two one-pair requests gathered together, one batch each (pair cap 1)."""
    executor = ThreadPoolExecutor(max_workers=1)
    scheduler = BatchScheduler(launch, executor, gpu_limits(pairs=1))
    timings = RequestTiming(), RequestTiming()

    async def two_clients():
        return await asyncio.gather(
            *(
                scheduler.submit(sequences(tag, [8]), timing)
                for tag, timing in zip((1, 2), timings, strict=True)
            )
        )

    run(two_clients())
    executor.shutdown()
    return timings


def test_a_cpu_batch_is_delivered_before_the_next_one_starts(forward: RecordingForward) -> None:
    first, second = first_two_requests_timings(forward)
    assert first.finished is not None and second.first_batch is not None
    assert first.finished <= second.first_batch


def test_a_gpu_batch_is_collected_after_the_next_one_is_queued() -> None:
    first, second = first_two_requests_timings(QueuedDevice())
    assert first.finished is not None and second.first_batch is not None
    assert second.first_batch < first.finished


def test_a_pass_that_fails_on_the_device_fails_only_its_batch() -> None:
    device = QueuedDevice()
    device.fail_when = lambda batch: any(ids[0] == 66 for ids in batch)
    executor = ThreadPoolExecutor(max_workers=1)
    scheduler = BatchScheduler(device, executor, gpu_limits(pairs=1))

    async def failing_beside_fine():
        failing, fine = await asyncio.gather(
            scheduler.submit(sequences(66, [4])),
            scheduler.submit(sequences(1, [4, 5])),
            return_exceptions=True,
        )
        return failing, fine, await scheduler.submit(sequences(2, [3]))

    failing, fine, after = run(failing_beside_fine())
    executor.shutdown()
    assert isinstance(failing, RuntimeError) and "injected" in str(failing)
    assert fine == [4.0, 9.0] and after == [4.0]
    assert ("launch", 1) in device.events and device.events.index(("launch", 1)) < device.events.index(
        ("collect", 0)
    )


def padded_pass_seconds(pairs: int, longest: int) -> float:
    """A GPU-like cost: a fixed millisecond per pass, plus a microsecond per padded token (lengths padded to a
    multiple of 16, as CUDA graphs pad them)."""
    return 1e-3 + 1e-6 * pairs * -(-longest // 16) * 16


@pytest.mark.parametrize(
    ("lengths", "first_pass"),
    [
        ([20] * 32 + [200] * 8, 32),  # 9.3 ms in one pass; 2.0 + 2.7 ms in two
        ([100] * 64, 64),  # nothing to gain from a cut
        ([20, 24, 30, 31], 4),  # a cut would cost a pass's overhead for no padding saved
        ([40] * 16 + [48] * 16 + [500] * 2, 32),  # the two long pairs alone; the short ones share a pass
        ([500] * 2 + [40] * 30, 2),  # in the order taken (a priority request's pairs first)
    ],
)
def test_a_batch_runs_as_the_passes_that_take_the_least_time(lengths: list[int], first_pass: int) -> None:
    assert cheapest_first_pass(lengths, padded_pass_seconds) == first_pass


def test_where_passes_are_timed_a_padded_batch_is_split_by_length(forward: RecordingForward) -> None:
    """The cut-off pairs go back to the queue in order, form the next batch, and every logit comes back."""
    scheduler, executor = make_scheduler(
        forward, padded_pass_seconds, max_batch_tokens=16384, max_batch_pairs=64, batch_wait_ms=0
    )
    lengths = [200, 20, 150, 20, 190, 30] + [25] * 26 + [180] * 3
    pairs = sequences(7, lengths)
    assert run(scheduler.submit(pairs)) == id_sums(pairs)
    executor.shutdown()
    assert [sorted(len(ids) for ids in batch) for batch in forward.batches] == [
        sorted(length for length in lengths if length <= 30),
        sorted(length for length in lengths if length > 30),
    ]
    assert scheduler.queued_pairs == 0
