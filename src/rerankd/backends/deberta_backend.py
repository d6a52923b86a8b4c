"""DeBERTa backend: the project's DeBERTa-v2/v3 network on CPU or CUDA, fed by any weight format (safetensors,
GGUF), with its tokens packed past padding, and CUDA graphs on a GPU."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer

from rerankd.backends.base import BackendInfo, Batch, ModelLoadError, PassSeconds
from rerankd.backends.cuda_graphs import CapturedPasses, bucketed_shape, bucketed_shapes
from rerankd.backends.torch_backend import (
    DTYPES,
    TorchBackend,
    apply_threads,
    faster_dtypes_on,
    padded_batch,
    resolve_device,
    resolve_dtype,
    torch_backend_info,
)
from rerankd.modeling.config import DebertaConfig, UnsupportedModelError
from rerankd.modeling.deberta import CPU_ROW_MULTIPLE, DebertaReranker, TokenLayout
from rerankd.modeling.onednn import bound_kernel_caches
from rerankd.modeling.reference_rows import Float32Rows
from rerankd.modeling.weights import CheckpointError, SplitEmbeddings, TensorReader, load_reranker
from rerankd.settings import RuntimeSettings


def reference_token_ids(tokenizer: Tokenizer, pairs: Sequence[tuple[str, str]], pad_id: int) -> set[int]:
    """Every token id `pairs` put into the model, special tokens and padding included."""
    encodings = tokenizer.encode_batch(list(pairs), add_special_tokens=True)
    return {pad_id, *itertools.chain.from_iterable(encoding.ids for encoding in encodings)}


class DebertaBackend(TorchBackend):
    """Runs a `DebertaReranker`, each batch padded to its longest pair, or on CUDA with `cuda_graphs` to the
    bucketed shape of its graph."""

    model: DebertaReranker
    mixes_precision = True

    def __init__(
        self, model: DebertaReranker, tokenizer: Tokenizer, info: BackendInfo, settings: RuntimeSettings
    ) -> None:
        super().__init__(model, model.config.pad_token_id, tokenizer, info, settings)
        # Captured once the dtype is final (`prepare_for_serving`): a graph holds the weights by address.
        self._graphs: CapturedPasses | None = None

    def _shape(self, batch: Batch) -> tuple[int, int]:
        shape = super()._shape(batch)
        return shape if self._graphs is None else bucketed_shape(*shape, self.info.max_length)

    def _pass(self, batch: Batch, shape: tuple[int, int], pin: bool) -> torch.Tensor:
        padded, mask = padded_batch(batch, shape, self._pad_id, pin)
        if self._graphs is not None:
            return self._graphs.run(padded, mask)
        # Laid out on the host, where finding the tokens costs no wait for the device.
        row_multiple = CPU_ROW_MULTIPLE if self._device.type == "cpu" else 1
        layout = TokenLayout.from_mask(mask, row_multiple).to(self._device)
        return self.model.relevance_logits(self._on_device(padded), self._on_device(mask), layout)

    def cast(self, dtype: str) -> None:
        if isinstance(self.model.word_embeddings, Float32Rows):  # the table was loaded in `dtype` already
            self.model.word_embeddings = self.model.word_embeddings.serving
        super().cast(dtype)

    def _mix_precision(self) -> None:
        self.model.compute_layers_in(torch.bfloat16)

    def prepare_for_serving(self) -> None:
        super().prepare_for_serving()
        if self._device.type == "cuda" and self._settings.cuda_graphs:
            self._graphs = CapturedPasses(self.model, self._device, self.info.max_length)
            batch_tokens, batch_pairs = self._settings.batch_tokens, self._settings.max_batch_pairs
            self._graphs.capture_all(bucketed_shapes(batch_tokens, batch_pairs, self.info.max_length))

    def pass_seconds(self) -> PassSeconds | None:
        return None if self._graphs is None else self._graphs.seconds


def build_deberta_backend(
    backend_name: str,
    raw_config: dict,
    reader: TensorReader,
    tokenizer: Tokenizer,
    settings: RuntimeSettings,
    source: Path,
    reference_pairs: Sequence[tuple[str, str]] = (),
) -> DebertaBackend:
    """Materialize the project's network from any weight format (`reader`) on the settings' device and dtype
    (`reference_pairs`: see `registry.load_backend`)."""
    apply_threads(settings)
    try:
        config = DebertaConfig.from_dict(raw_config)
        device = resolve_device(settings.device)
        dtype = resolve_dtype(settings.dtype, device)
        if device.type == "cpu":
            bound_kernel_caches()
        # The first precision `--dtype auto` tries; where it is the weights' own dtype (not int8's or
        # bfloat16-mixed's), the word-embedding table is loaded in it.
        rivals = faster_dtypes_on(device, mixes=True) if settings.dtype == "auto" else ()
        split = None
        if rivals and rivals[0][0] in DTYPES and reference_pairs:
            token_ids = reference_token_ids(tokenizer, reference_pairs, config.pad_token_id)
            split = SplitEmbeddings(DTYPES[rivals[0][0]], token_ids)
        model = load_reranker(config, reader, dtype, device, split)
    except (UnsupportedModelError, CheckpointError) as error:
        raise ModelLoadError(f"{source}: {error}") from error
    except KeyError as error:
        raise ModelLoadError(f"{source}: the model config lacks the required key {error}") from error
    info = torch_backend_info(
        source, raw_config, backend_name, "deberta-v2", device, dtype, config.max_position_embeddings
    )
    return DebertaBackend(model, tokenizer, info, settings)
