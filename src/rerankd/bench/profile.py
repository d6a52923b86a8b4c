"""Where a pass's time goes: one forward pass of each workload, as rerankd's torch backend runs it in the
dtype `--dtype auto` served, under torch's profiler, its ops' own time grouped by kind of work.

The pass runs on a worker thread, as the server's passes do (a thread's heap behaves unlike the main
thread's for the large attention buffers), and is the one of the workload's passes, cut as the scheduler cuts
a request, that holds its median pair.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

from rerankd.backends.base import Batch, Pair, RerankBackend
from rerankd.backends.registry import load_backend, plan_backend
from rerankd.bench.results import PassProfile
from rerankd.bench.timing import timed_requests
from rerankd.bench.workloads import Workload, served_pair_tokenizer
from rerankd.engine.fair_queue import FairQueue
from rerankd.modeling.deberta import PACKED_ATTENTION_OP
from rerankd.modeling.relative import FUSED_OP
from rerankd.settings import DEFAULT_BATCH_TOKENS, RuntimeSettings

logger = logging.getLogger(__name__)

# Kinds of work, by the ops that do it (their own time, not their callees'); any other op is "other".
OP_KINDS: dict[str, tuple[str, ...]] = {
    "dense layers (matmuls)": (
        "onednn::qlinear_pointwise",
        "mkldnn::_linear_pointwise",
        "aten::addmm",
        "aten::mm",
    ),
    "attention matmuls (QK, relative terms, context)": ("aten::bmm", "aten::baddbmm", "aten::baddbmm_"),
    "softmax": ("aten::_softmax",),
    "attention bias, mask and softmax (fused kernel)": (FUSED_OP,),
    "whole attention (packed kernel: QK, relative terms, softmax, context)": (PACKED_ATTENTION_OP,),
    "int8 input quantization": ("aten::aminmax", "aten::quantize_per_tensor"),
    "element-wise (bias, mask and residual adds, GELU, scaling)": (
        "aten::add",
        "aten::add_",
        "aten::mul",
        "aten::div",
        "aten::gelu",
    ),
    "layer norms": ("aten::native_layer_norm",),
    "layout (copies, padding, gathers, fills)": (
        "aten::copy_",
        "aten::fill_",
        "aten::index_select",
        "aten::index_copy_",
        "aten::embedding",
    ),
}
OTHER = "other"
TIMED_PASSES = 3


def kind_of(op: str) -> str:
    return next((kind for kind, ops in OP_KINDS.items() if op in ops), OTHER)


def middle_pass(workload: Workload, folder: Path, budget: int, max_pairs: int) -> Batch:
    """The pass holding the workload's median pair, its pairs cut by the scheduler's own queue as it cuts
    one request's: shortest first, as many as fit `budget` tokens padded to the longest."""
    pairs = served_pair_tokenizer(folder).encode_pairs(workload.query, workload.documents).pairs
    queue: FairQueue[Pair] = FairQueue()
    queue.add(pairs)
    median = len(pairs) // 2
    while queue:
        batch = [pairs[index] for _, index in queue.next_batch(budget, max_pairs)]
        if median < len(batch):
            return Batch(batch)
        median -= len(batch)
    raise ValueError(f"{workload.name} has no pairs")


def _profiled(backend: RerankBackend, batch: Batch, workload: str) -> PassProfile:
    backend.relevance_logits(batch)  # kernel selection and caches, outside the timing
    seconds = min(timed_requests(lambda: backend.relevance_logits(batch), TIMED_PASSES, float("inf")))
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        backend.relevance_logits(batch)
    by_kind: dict[str, float] = defaultdict(float)
    for event in profiler.key_averages():
        by_kind[kind_of(event.key)] += event.self_cpu_time_total
    total = sum(by_kind.values())
    shares = {kind: by_kind[kind] / total for kind in [*OP_KINDS, OTHER] if by_kind[kind] > 0}
    return PassProfile(workload, backend.info.dtype, len(batch), batch.longest, seconds, shares)


def profile_passes(folder: Path, dtype: str, workloads: list[Workload]) -> list[PassProfile]:
    """A pass of each workload on a CPU (`middle_pass`), `folder`'s model loaded in `dtype` as the server
    prepares it."""
    settings = RuntimeSettings(device="cpu", dtype=dtype)
    backend = load_backend(plan_backend(folder, settings))
    backend.prepare_for_serving()
    budget = DEFAULT_BATCH_TOKENS["cpu"]
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="profiled-pass") as forward:
        profiles = [
            forward.submit(
                _profiled,
                backend,
                middle_pass(workload, folder, budget, settings.max_batch_pairs),
                workload.name,
            ).result()
            for workload in workloads
        ]
    for measured in profiles:
        logger.info(
            "%s: a pass of %d x %d tokens in %s takes %.2f s",
            measured.workload, measured.pairs, measured.length, measured.dtype, measured.seconds,
        )  # fmt: skip
    return profiles
