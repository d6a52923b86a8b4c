"""LLM reranker backend: `transformers`' Qwen3 and Qwen2 causal LMs (Qwen3-Reranker, mxbai-rerank-v2) on CPU
or CUDA, each pair wrapped in its family's prompt by the engine and scored at its last token."""

from __future__ import annotations

from pathlib import Path

import torch

from rerankd.backends.base import Batch, ModelLoadError
from rerankd.backends.encoder_backend import transformers_load_errors
from rerankd.backends.folder_model import FolderModel
from rerankd.backends.torch_backend import (
    TorchBackend,
    apply_threads,
    padded_batch,
    resolve_device,
    resolve_dtype,
    torch_backend_info,
)
from rerankd.modeling.causal import CausalFamily, CausalReranker, load_causal
from rerankd.settings import RuntimeSettings


class CausalBackend(TorchBackend):
    """Runs a `CausalReranker` on right-padded batches, each pair's logit read at its own last token."""

    model: CausalReranker

    def _pass(self, batch: Batch, shape: tuple[int, int], pin: bool) -> torch.Tensor:
        padded, mask = padded_batch(batch, shape, self._pad_id, pin)
        lengths = mask.sum(dim=1)  # rows past the pairs hold one token
        return self.model.relevance_logits(
            self._on_device(padded), self._on_device(mask), self._on_device(lengths)
        )


def build_causal_backend(
    folder: Path, model: FolderModel, family: CausalFamily, settings: RuntimeSettings
) -> CausalBackend:
    """The folder's LLM reranker on the settings' device and dtype, with its family's prompt."""
    tokenizer, raw_config = model.tokenizer, model.config
    yes, no = (tokenizer.token_to_id(answer) for answer in family.prompt.answers)
    if yes is None or no is None:
        raise ModelLoadError(
            f"{folder}: the tokenizer lacks the answer tokens {family.prompt.answers} that {family.name} is "
            "scored by"
        )
    apply_threads(settings)
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    with transformers_load_errors(folder, family.architecture):
        network = load_causal(folder, (yes, no), dtype, device)
    info = torch_backend_info(folder, raw_config, "torch", family.name, device, dtype, model.max_length)
    pad_id = raw_config.get("pad_token_id")
    backend = CausalBackend(network, 0 if pad_id is None else int(pad_id), tokenizer, info, settings)
    backend.prompt = family.prompt
    return backend
