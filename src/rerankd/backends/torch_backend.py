"""Torch backend: the project's DeBERTa network on CPU or CUDA, fed by any weight format."""

from __future__ import annotations

import itertools
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from rerankd.backends.base import (
    BackendInfo,
    Batch,
    ModelLoadError,
    PassSeconds,
    PendingLogits,
    ReadyLogits,
    RerankBackend,
)
from rerankd.backends.cuda_graphs import CapturedPasses, bucketed_shape, bucketed_shapes
from rerankd.backends.heap import HeapTrimmer
from rerankd.catalog import UNTRAINED_KEY
from rerankd.formats.safetensors import SafetensorsCheckpoint, SafetensorsCheckpointError
from rerankd.formats.tokenizer import TokenizerLoadError, load_tokenizer
from rerankd.modeling.config import DebertaConfig, UnsupportedModelError
from rerankd.modeling.deberta import DebertaReranker, TokenLayout
from rerankd.modeling.onednn import bound_kernel_caches, pack_dense_layers
from rerankd.modeling.reference_rows import Float32Rows
from rerankd.modeling.weights import CheckpointError, SplitEmbeddings, TensorReader, load_reranker
from rerankd.settings import RuntimeSettings

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def faster_dtype_on(device: torch.device) -> str | None:
    """The precision `--dtype auto` tries on `device` before settling for float32."""
    if device.type == "cuda":
        return "float16"
    return "bfloat16" if cpu_has_bf16_units() else None


def reference_token_ids(tokenizer: Tokenizer, pairs: Sequence[tuple[str, str]], pad_id: int) -> set[int]:
    """Every token id `pairs` put into the model, special tokens and padding included."""
    encodings = tokenizer.encode_batch(list(pairs), add_special_tokens=True)
    return {pad_id, *itertools.chain.from_iterable(encoding.ids for encoding in encodings)}


def resolve_dtype(requested: str, device: torch.device) -> torch.dtype:
    """auto loads float32; the engine then keeps a faster dtype only if the model's scores hold in it."""
    if requested == "auto":
        return torch.float32
    if requested not in DTYPES:
        raise ModelLoadError(f"--dtype {requested}: choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[requested]


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
    """Runs a `DebertaReranker` under `torch.inference_mode`, padding each batch to its longest pair, or on
    CUDA with `cuda_graphs` to the bucketed shape of its graph."""

    def __init__(
        self,
        model: DebertaReranker,
        tokenizer: Tokenizer,
        info: BackendInfo,
        settings: RuntimeSettings,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.info = info
        self._device = torch.device(info.device)
        self._pad_id = model.config.pad_token_id
        self._heap = HeapTrimmer() if self._device.type == "cpu" else None
        if self._heap is not None:  # what the load freed (read buffers, unfused projections) goes back
            self._heap.trim()
        self._settings = settings
        # Captured once the dtype is final (`prepare_for_serving`): a graph holds the weights by address.
        self._graphs: CapturedPasses | None = None

    def relevance_logits(self, batch: Batch) -> list[float]:
        return self.launch(batch).result()

    def launch(self, batch: Batch) -> PendingLogits:
        """On a CPU the logits are computed here; on a GPU this returns as soon as the pass is queued (no call
        in it waits for the device), and `result` waits for the logits' copy back."""
        shape = (len(batch), batch.longest)
        if self._graphs is not None:
            shape = bucketed_shape(*shape, self.info.max_length)
        # Page-locked host buffers make the copies to a GPU asynchronous (pinning needs a CUDA runtime).
        on_gpu = self._device.type == "cuda"
        padded, mask = padded_batch(batch, shape, self._pad_id, pin=on_gpu)
        with torch.inference_mode():
            logits = self._pass(padded, mask)[: len(batch)]
            if on_gpu:
                return DeviceLogits.copied_from(logits)
        scores = logits.tolist()
        if self._heap is not None:
            self._heap.batch_done()
        return ReadyLogits(scores)

    def _pass(self, padded: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self._graphs is not None:
            return self._graphs.run(padded, mask)
        # Laid out on the host, where finding the tokens costs no wait for the device.
        layout = TokenLayout.from_mask(mask).to(self._device)
        return self.model.relevance_logits(
            padded.to(self._device, non_blocking=True), mask.to(self._device, non_blocking=True), layout
        )

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

    def faster_dtype(self) -> str | None:
        return faster_dtype_on(self._device) if self.info.dtype == "float32" else None

    def cast(self, dtype: str) -> None:
        if isinstance(self.model.word_embeddings, Float32Rows):  # the table was loaded in `dtype` already
            self.model.word_embeddings = self.model.word_embeddings.serving
        self.model.to(DTYPES[dtype])  # tensor by tensor: the peak is the weights plus one converted tensor
        if self._heap is not None:  # the float32 weights' pages, freed in the heap, go back to the OS
            self._heap.trim()
        self.info = replace(self.info, dtype=dtype)

    def prepare_for_serving(self) -> None:
        batch_tokens, batch_pairs = self._settings.batch_tokens, self._settings.max_batch_pairs
        if self._device.type == "cpu" and pack_dense_layers(self.model, batch_tokens):
            logger.info("dense layers packed for oneDNN's %s kernels", self.info.dtype)
        if self._device.type == "cuda" and self._settings.cuda_graphs:
            self._graphs = CapturedPasses(self.model, self._device, self.info.max_length)
            self._graphs.capture_all(bucketed_shapes(batch_tokens, batch_pairs, self.info.max_length))

    def pass_seconds(self) -> PassSeconds | None:
        return None if self._graphs is None else self._graphs.seconds


def build_torch_backend(
    backend_name: str,
    raw_config: dict,
    reader: TensorReader,
    tokenizer: Tokenizer,
    settings: RuntimeSettings,
    source: Path,
    reference_pairs: Sequence[tuple[str, str]] = (),
) -> TorchBackend:
    """Materialize the project's network from any weight format (`reader`) on the settings' device and dtype
    (`reference_pairs`: see `registry.load_backend`)."""
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)  # process-wide: one forward pass runs at a time anyway
    try:
        config = DebertaConfig.from_dict(raw_config)
        device = resolve_device(settings.device)
        dtype = resolve_dtype(settings.dtype, device)
        if device.type == "cpu":
            bound_kernel_caches()
        faster = faster_dtype_on(device) if settings.dtype == "auto" else None
        split = None
        if faster is not None and reference_pairs:
            token_ids = reference_token_ids(tokenizer, reference_pairs, config.pad_token_id)
            split = SplitEmbeddings(DTYPES[faster], token_ids)
        model = load_reranker(config, reader, dtype, device, split)
    except (UnsupportedModelError, CheckpointError) as error:
        raise ModelLoadError(f"{source}: {error}") from error
    except KeyError as error:
        raise ModelLoadError(f"{source}: the model config lacks the required key {error}") from error
    untrained = bool(raw_config.get(UNTRAINED_KEY, False))
    if untrained:
        logger.warning("%s holds RANDOM, UNTRAINED weights: its scores are meaningless", source)
    info = BackendInfo(
        backend=backend_name,
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        max_length=config.max_position_embeddings,
        untrained=untrained,
    )
    return TorchBackend(model, tokenizer, info, settings)


def load_safetensors_backend(
    folder: Path, settings: RuntimeSettings, reference_pairs: Sequence[tuple[str, str]] = ()
) -> TorchBackend:
    """A Hugging Face-format folder: config.json, safetensors weights, tokenizer.json or spm.model."""
    try:
        raw_config = json.loads((folder / "config.json").read_text())
        tokenizer = load_tokenizer(folder)
        reader = SafetensorsCheckpoint(folder)
    except FileNotFoundError as error:
        raise ModelLoadError(f"{folder}: {error.filename} is missing") from error
    except json.JSONDecodeError as error:
        raise ModelLoadError(f"{folder / 'config.json'}: not valid JSON ({error})") from error
    except (SafetensorsCheckpointError, TokenizerLoadError) as error:
        raise ModelLoadError(f"{folder}: {error}") from error
    return build_torch_backend("torch", raw_config, reader, tokenizer, settings, folder, reference_pairs)
