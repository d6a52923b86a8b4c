"""The forward pass captured as CUDA graphs, one per bucketed batch shape, and replayed.

A pass issues a kernel or more per operation of every layer. Launched one by one from Python they can cost
the host as long as the GPU takes to run them at serving batch sizes, so the device waits on the host
(docs/decisions.md has the measurements). A captured graph is
replayed with one launch. A graph fixes every tensor's shape and address, so each batch is padded up to a
bucket: its pairs to 1, 2, 4 or 8, then a multiple of 8; its length to a multiple of 16. Every bucket a batch
can reach is captured and timed when the model is prepared for serving (vLLM works the same way), into one
memory pool that all graphs share: one batch runs at a time, so their work memory is never live at once.
Inside a graph every position is computed, padding included (`TokenLayout.dense`), as the reference
computes it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from rerankd.modeling.deberta import DebertaReranker, TokenLayout

logger = logging.getLogger(__name__)

LENGTH_STEP = 16
PAIRS_STEP = 8


def bucketed_shape(pairs: int, length: int, max_length: int) -> tuple[int, int]:
    """The (pairs, length) a batch is padded to, so that few shapes, each with its graph, serve any batch."""
    rows = 1 << (pairs - 1).bit_length() if pairs <= PAIRS_STEP else -(-pairs // PAIRS_STEP) * PAIRS_STEP
    return rows, min(-(-length // LENGTH_STEP) * LENGTH_STEP, max(length, max_length))


def bucketed_shapes(batch_tokens: int, batch_pairs: int, max_length: int) -> list[tuple[int, int]]:
    """Every shape a batch within these limits (pairs x longest pair ≤ `batch_tokens`, at most `batch_pairs`
    pairs of at most `max_length` tokens) is padded to, the largest first. A bucket is reachable when its
    fewest pairs of its shortest length fit; a length bucket's shortest is a multiple of the step, plus 1."""
    shapes = {
        bucketed_shape(pairs, length, max_length)
        for pairs in range(1, batch_pairs + 1)
        for length in range(1, min(max_length, max(batch_tokens // pairs, 1)) + 1, LENGTH_STEP)
    }
    return sorted(shapes, key=lambda shape: (shape[0] * shape[1], shape), reverse=True)


@dataclass(frozen=True)
class _CapturedPass:
    """A graph and the tensors its kernels read and write, by address: kept alive as long as the graph."""

    graph: torch.cuda.CUDAGraph
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    layout: TokenLayout
    logits: torch.Tensor


class CapturedPasses:
    """Replays `model`'s pass for batches already padded to a bucketed shape, capturing each shape once."""

    def __init__(self, model: DebertaReranker, device: torch.device, max_length: int) -> None:
        self._model = model
        self._device = device
        self._max_length = max_length
        self._pool = torch.cuda.graph_pool_handle()
        # This model's own stream for every capture and its first run. Not torch's capture stream, which is
        # one for the process, made on whichever GPU captured first, and shared by every model's forward
        # thread. Not a new stream per capture: the caching allocator keeps freed blocks per stream, so that
        # held each shape's work memory apart (docs/decisions.md).
        self._stream = torch.cuda.Stream(device)
        self._captured: dict[tuple[int, int], _CapturedPass] = {}
        self._replay_seconds: dict[tuple[int, int], float] = {}

    @property
    def shapes(self) -> list[tuple[int, int]]:
        return list(self._captured)

    def capture_all(self, shapes: list[tuple[int, int]]) -> None:
        """Capture and time every shape up front, as vLLM does: no request waits for a capture (each one
        synchronizes the device), and the scheduler knows what each pass costs (`seconds`). The time and
        memory this takes: docs/decisions.md."""
        started = time.perf_counter()
        torch.cuda.empty_cache()  # so that the memory logged is the graphs', not blocks the load left cached
        reserved = torch.cuda.memory_reserved(self._device)
        for shape in shapes:
            if shape not in self._captured:
                self._capture(shape)
        with torch.cuda.device(self._device), torch.cuda.stream(self._stream):
            for shape in shapes:
                self._replay_seconds[shape] = self._timed_replay(self._captured[shape].graph)
        logger.info(
            "captured the pass as a CUDA graph for each of %d batch shapes, and timed them, in %.1f s "
            "(%.0f MiB of GPU memory)",
            len(shapes),
            time.perf_counter() - started,
            (torch.cuda.memory_reserved(self._device) - reserved) / 2**20,
        )

    def seconds(self, pairs: int, length: int) -> float:
        """The measured time of the pass a batch of `pairs` pairs, the longest of `length` tokens, runs as."""
        return self._replay_seconds[bucketed_shape(pairs, length, self._max_length)]

    @staticmethod
    def _timed_replay(graph: torch.cuda.CUDAGraph, replays: int = 2) -> float:
        """The fastest of a few replays, timed on the device."""
        fastest = float("inf")
        for _ in range(replays):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            fastest = min(fastest, start.elapsed_time(end) / 1e3)
        return fastest

    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Queue the pass on host tensors (page-locked, so the copies do not wait) and return the graph's
        logits, one per row. They are overwritten by the next replay of this shape, which the current stream
        orders after anything queued on them before it."""
        shape = (input_ids.shape[0], input_ids.shape[1])
        captured = self._captured.get(shape) or self._capture(shape)
        captured.input_ids.copy_(input_ids, non_blocking=True)
        captured.attention_mask.copy_(attention_mask, non_blocking=True)
        captured.graph.replay()
        return captured.logits

    def _capture(self, shape: tuple[int, int]) -> _CapturedPass:
        started = time.perf_counter()
        input_ids = torch.zeros(shape, dtype=torch.long, device=self._device)
        attention_mask = torch.ones(shape, dtype=torch.long, device=self._device)
        layout = TokenLayout.dense(*shape, self._device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(self._device):  # a capture belongs to the current device: make it the model's
            # A first run outside the capture sets up what must not be created in it (cuBLAS handles,
            # workspaces).
            self._stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self._stream):
                self._model.relevance_logits(input_ids, attention_mask, layout)
            torch.cuda.current_stream().wait_stream(self._stream)
            # Thread-local: another model's forward thread may launch work on the same GPU meanwhile.
            capture = torch.cuda.graph(graph, self._pool, self._stream, capture_error_mode="thread_local")
            with capture:
                logits = self._model.relevance_logits(input_ids, attention_mask, layout)
        captured = _CapturedPass(graph, input_ids, attention_mask, layout, logits)
        self._captured[shape] = captured
        logger.debug(
            "captured the pass for %d pairs x %d tokens as a CUDA graph in %.0f ms (%d shapes)",
            *shape,
            1e3 * (time.perf_counter() - started),
            len(self._captured),
        )
        return captured
