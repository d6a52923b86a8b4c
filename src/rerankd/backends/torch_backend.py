"""What every torch network shares on CPU or CUDA: device and dtype resolution, padded batches, logits on
their way back from a GPU, and the backend that runs passes under `torch.inference_mode`. The networks'
own backends build on it: DeBERTa (`deberta_backend`) and `transformers`' encoders (`encoder_backend`)."""

from __future__ import annotations

import logging
import os
from abc import abstractmethod
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from rerankd.backends.base import (
    BackendInfo,
    Batch,
    BetweenSteps,
    ModelLoadError,
    PendingLogits,
    ReadyLogits,
    RerankBackend,
)
from rerankd.backends.heap import HeapTrimmer, keep_activations_in_heap
from rerankd.catalog import UNTRAINED_KEY
from rerankd.modeling.onednn import ROW_PIECE, pack_dense_layers, split_rows_where_faster
from rerankd.modeling.quantized import int8_available, int8_dense_speedup, quantize_dense_layers
from rerankd.settings import RuntimeSettings

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Computed in int8, stored in float32 until the dense layers are quantized (`modeling/quantized.py`).
INT8 = "int8"
# On a CPU with bf16 units, `--dtype auto` times int8 against bf16 only where int8's dense layer runs at least
# this many times bf16's: the rest of an int8 pass is bfloat16-mixed's, slower than bf16's. Between two CPUs
# measured: 1.24x on AMX (int8 served 0.90x bf16), 1.89x on an AMD EPYC with AVX512-BF16 (1.34x).
MIN_INT8_DENSE_SPEEDUP = 1.5
# bf16 dense layers and attention around a float32 residual stream and norms; loaded in float32, then mixed
# (`DebertaLayer.compute_in`): a quarter of bf16's drift at nearly its speed (docs/decisions.md).
MIXED = "bfloat16-mixed"


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {requested}: CUDA is not available on this machine (use cpu or auto)")
    if device.type not in ("cpu", "cuda"):
        raise ModelLoadError(f"--device {requested}: supported devices are auto, cpu and cuda")
    return device


# oneDNN's instruction sets below AVX512_CORE_BF16, as `ONEDNN_MAX_CPU_ISA` (formerly `DNNL_MAX_CPU_ISA`)
# names them: capped at one of these, oneDNN emulates bf16 whatever the CPU has.
ONEDNN_ISAS_WITHOUT_BF16 = frozenset(
    {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}
)


def cpu_has_bf16_units() -> bool:
    """AMX tiles or AVX512-BF16, and oneDNN free to use them: where it runs bf16 matmuls several times faster
    than fp32.

    Without them (e.g. AVX2-only CPUs) bf16 is emulated, far slower than fp32 (docs/decisions.md).
    """
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or ""
    if cap.strip().upper() in ONEDNN_ISAS_WITHOUT_BF16:
        return False
    return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


def cpu_has_int8_matmul() -> bool:
    """oneDNN's int8 matmul on this CPU: about twice float32's multiply-adds per second on AVX2, more with
    VNNI or AMX (docs/decisions.md)."""
    return int8_available()


def faster_dtypes_on(device: torch.device, mixes: bool = False) -> tuple[tuple[str, ...], ...]:
    """The precisions `--dtype auto` tries on `device` before settling for float32, as rivals: each a
    precision and its fallbacks, in order. float16 on CUDA; on a CPU with bf16 units bfloat16 (then
    bfloat16-mixed where the network `mixes`), against int8 where its dense layers may outrun bf16's, since
    which of the two runs faster depends on the CPU; on other CPUs int8 where oneDNN has an int8 matmul."""
    if device.type == "cuda":
        return (("float16",),)
    if not cpu_has_bf16_units():
        return ((INT8,),) if cpu_has_int8_matmul() else ()
    bf16 = ("bfloat16", MIXED) if mixes else ("bfloat16",)
    return (bf16, (INT8,)) if cpu_has_int8_matmul() and int8_may_outrun_bf16() else (bf16,)


def int8_may_outrun_bf16() -> bool:
    """Whether int8's dense layers run enough faster than bf16's here that an int8 pass may beat a bf16 one,
    the rest of it computed as in bfloat16-mixed (docs/decisions.md)."""
    return int8_dense_speedup() >= MIN_INT8_DENSE_SPEEDUP


def apply_threads(settings: RuntimeSettings) -> None:
    """`--threads`, process-wide: one forward pass runs at a time anyway."""
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)


def resolve_dtype(requested: str, device: torch.device) -> torch.dtype:
    """auto loads float32; the engine then keeps a faster dtype only if the model's scores hold in it."""
    if requested == "auto":
        return torch.float32
    if requested in (INT8, MIXED):
        if device.type != "cpu":
            raise ModelLoadError(f"--dtype {requested} runs on a CPU; on {device} use float16 or bfloat16")
        if requested == INT8 and not int8_available():
            raise ModelLoadError("--dtype int8: this torch has no oneDNN int8 matmul on this CPU")
        return torch.float32  # quantized or mixed once loaded (`TorchBackend.cast`)
    if requested not in DTYPES:
        raise ModelLoadError(f"--dtype {requested}: choose one of auto, {', '.join(DTYPES)}, {INT8}, {MIXED}")
    return DTYPES[requested]


def torch_backend_info(
    source: Path,
    raw_config: dict,
    backend: str,
    family: str,
    device: torch.device,
    dtype: torch.dtype,
    max_length: int,
) -> BackendInfo:
    """A torch network's info, warning when config.json marks its weights random."""
    untrained = bool(raw_config.get(UNTRAINED_KEY, False))
    if untrained:
        logger.warning("%s holds RANDOM, UNTRAINED weights: its scores are meaningless", source)
    return BackendInfo(
        backend=backend,
        family=family,
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        max_length=max_length,
        untrained=untrained,
    )


def layer_stack(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The network's repeated layers (its longest `ModuleList`: DeBERTa's and Qwen's `layers`, BERT's
    `encoder.layer`), within which a pass can make way for another."""
    stacks = [module for module in model.modules() if isinstance(module, torch.nn.ModuleList)]
    return max(stacks, key=len, default=torch.nn.ModuleList())


def padded_batch(
    batch: Batch, shape: tuple[int, int], pad_id: int, pin: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask of `shape` (rows, length): each sequence from the left, padding after it.
    Rows past the sequences (a batch padded to a bucketed shape) hold one unmasked pad token, so no row of
    the attention is masked whole. Built in numpy rather than row by row in torch, which is several times
    slower: host time that a GPU otherwise waits through (docs/decisions.md)."""
    lengths = np.asarray(batch.lengths, dtype=np.int64)
    padded = torch.full(shape, pad_id, dtype=torch.long, pin_memory=pin)
    mask = torch.zeros(shape, dtype=torch.long, pin_memory=pin)
    real = np.arange(shape[1]) < lengths[:, None]
    tokens = np.fromiter(batch.flat_ids(), dtype=np.int64, count=int(lengths.sum()))
    padded.numpy()[: len(lengths)][real] = tokens
    mask.numpy()[: len(lengths)][real] = 1
    mask.numpy()[len(lengths) :, 0] = 1
    return padded, mask


def segment_ids(batch: Batch, shape: tuple[int, int], pin: bool) -> torch.Tensor:
    """Token type ids of `shape`, as `padded_batch` lays the pairs out: 1 from each pair's second segment to
    its end, 0 elsewhere (padding included)."""
    types = torch.zeros(shape, dtype=torch.long, pin_memory=pin)
    starts = np.asarray([pair.second_segment for pair in batch.pairs], dtype=np.int64)
    lengths = np.asarray(batch.lengths, dtype=np.int64)
    columns = np.arange(shape[1])
    second = (columns >= starts[:, None]) & (columns < lengths[:, None])
    types.numpy()[: len(lengths)][second] = 1
    return types


class DeviceLogits(PendingLogits):
    """Logits on their way from a GPU to page-locked host memory; `result` waits for the copy to land."""

    ready = False

    def __init__(self, host: torch.Tensor, landed: torch.cuda.Event) -> None:
        self._host = host
        self._landed = landed

    @classmethod
    def copied_from(cls, logits: torch.Tensor) -> DeviceLogits:
        """Queue the copy behind the pass that computes `logits`, on the current stream."""
        host = torch.empty(logits.shape, dtype=logits.dtype, pin_memory=True)
        host.copy_(logits, non_blocking=True)
        landed = torch.cuda.Event()
        landed.record()
        return cls(host, landed)

    def result(self) -> list[float]:
        self._landed.synchronize()
        return self._host.tolist()


class TorchBackend(RerankBackend):
    """A torch network's passes: each batch padded to its longest pair (or, where a subclass runs CUDA
    graphs, to its graph's bucket) and run under `torch.inference_mode`. A subclass says how a padded batch
    reaches its network (`_pass`)."""

    # Whether the network computes in bf16 around a float32 residual stream (`_mix_precision`): in
    # `--dtype bfloat16-mixed`, and around int8's matmuls on CPUs with bf16 units.
    mixes_precision = False

    def __init__(
        self,
        model: torch.nn.Module,
        pad_id: int,
        tokenizer: Tokenizer,
        info: BackendInfo,
        settings: RuntimeSettings,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.info = info
        self._device = torch.device(info.device)
        self._pad_id = pad_id
        self._heap = HeapTrimmer() if self._device.type == "cpu" else None
        if self._heap is not None:  # what the load freed (read buffers, unfused projections) goes back
            self._heap.trim()
            keep_activations_in_heap()
        self._settings = settings
        self._between_steps: BetweenSteps | None = None  # the running CPU pass's
        if settings.dtype in (INT8, MIXED):
            self.cast(settings.dtype)

    def relevance_logits(self, batch: Batch) -> list[float]:
        return self.launch(batch).result()

    def launch(self, batch: Batch, between_steps: BetweenSteps | None = None) -> PendingLogits:
        """On a CPU the logits are computed here, calling `between_steps` after each step of each layer (a
        pass run from there has its own, or none); on a GPU this returns as soon as the pass is queued (no
        call in it waits for the device), and `result` waits for the logits' copy back."""
        # Page-locked host buffers make the copies to a GPU asynchronous (pinning needs a CUDA runtime).
        on_gpu = self._device.type == "cuda"
        outer, self._between_steps = self._between_steps, between_steps
        try:
            with torch.inference_mode():
                logits = self._pass(batch, self._shape(batch), pin=on_gpu)[: len(batch)]
                if on_gpu:
                    return DeviceLogits.copied_from(logits)
        finally:
            self._between_steps = outer
        scores = logits.tolist()
        if self._heap is not None:
            self._heap.batch_done()
        return ReadyLogits(scores)

    def _after_step(self, *_: object) -> None:
        if self._between_steps is not None:
            self._between_steps()

    def _shape(self, batch: Batch) -> tuple[int, int]:
        """The padded shape a batch runs as: (pairs, longest pair)."""
        return len(batch), batch.longest

    @abstractmethod
    def _pass(self, batch: Batch, shape: tuple[int, int], pin: bool) -> torch.Tensor:
        """Queue the network's pass over `batch` padded to `shape` (host buffers page-locked when `pin`);
        one logit per row."""

    def _on_device(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self._device, non_blocking=True)

    def health(self) -> str | None:
        """On a GPU, whether the device still answers: after a fault (an illegal access, a lost device) every
        CUDA call fails. The query does not wait for running passes."""
        if self._device.type != "cuda":
            return None
        try:
            torch.cuda.mem_get_info(self._device)
        except RuntimeError as error:
            return f"{self._device}: {error}"
        return None

    def faster_dtypes(self) -> tuple[tuple[str, ...], ...]:
        return faster_dtypes_on(self._device, self.mixes_precision) if self.info.dtype == "float32" else ()

    def cast(self, dtype: str) -> None:
        if dtype == INT8:
            if not quantize_dense_layers(layer_stack(self.model), self._settings.batch_tokens):
                raise ModelLoadError("--dtype int8: oneDNN's int8 matmul is missing or wrong in this torch")
            if self.mixes_precision and cpu_has_bf16_units():  # attention and activations in bf16 too
                self._mix_precision()
        elif dtype == MIXED:
            self._mix_precision()
        else:  # tensor by tensor: the peak is the weights plus one converted tensor
            self.model.to(DTYPES[dtype])
        if self._heap is not None:  # the float32 weights' pages, freed in the heap, go back to the OS
            self._heap.trim()
        self.info = replace(self.info, dtype=dtype)

    def _mix_precision(self) -> None:
        """Layers computing in bf16 around a float32 residual stream, in the networks that have it: `--dtype
        bfloat16-mixed`, and int8 on CPUs with bf16 units (around its int8 matmuls)."""
        raise ModelLoadError(f"--dtype {MIXED}: only the DeBERTa network computes in mixed precision")

    def prepare_for_serving(self) -> None:
        """On a CPU: the dense layers packed for oneDNN, then `between_steps` hooked after each step of
        every layer (its direct children: projections, norms, the attention and the MLP) and after the
        layer, so that a pass makes way for another within a few milliseconds; hooked last, since packing
        replaces modules."""
        if self._device.type != "cpu":
            return
        if pack_dense_layers(self.model, self._settings.batch_tokens):
            logger.info("dense layers packed for oneDNN's %s kernels", self.info.dtype)
            for shape in split_rows_where_faster(self.model, self._settings.batch_tokens):
                logger.info(
                    "dense layers %d -> %d run in pieces of %d rows (faster so here)", *shape, ROW_PIECE
                )
        for layer in layer_stack(self.model):
            for step in (*layer.children(), layer):
                step.register_forward_hook(self._after_step)
