"""Encoder backend: `transformers`' BERT, ELECTRA, RoBERTa/XLM-RoBERTa and ModernBERT sequence classifiers on
CPU or CUDA, with the token type ids of each pair's segments where the network reads them."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from rerankd.backends.base import Batch, ModelLoadError
from rerankd.backends.folder_model import FolderModel
from rerankd.backends.torch_backend import (
    TorchBackend,
    apply_threads,
    padded_batch,
    resolve_device,
    resolve_dtype,
    segment_ids,
    torch_backend_info,
)
from rerankd.modeling.config import UnsupportedModelError
from rerankd.modeling.encoders import EncoderFamily, EncoderReranker, load_encoder
from rerankd.settings import RuntimeSettings


class EncoderBackend(TorchBackend):
    """Runs an `EncoderReranker`, each batch padded to its longest pair (the fair queue hands over pairs of
    similar length, so little is padding). No CUDA graphs: `transformers`' networks are not captured."""

    model: EncoderReranker

    def _pass(self, batch: Batch, shape: tuple[int, int], pin: bool) -> torch.Tensor:
        padded, mask = padded_batch(batch, shape, self._pad_id, pin)
        types = self._on_device(segment_ids(batch, shape, pin)) if self.model.token_types else None
        return self.model.relevance_logits(self._on_device(padded), self._on_device(mask), types)


def build_encoder_backend(
    folder: Path, model: FolderModel, family: EncoderFamily, settings: RuntimeSettings
) -> EncoderBackend:
    """The folder's classifier on the settings' device and dtype."""
    apply_threads(settings)
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    with transformers_load_errors(folder, family.architecture):
        network = load_encoder(folder, family, dtype, device)
    info = torch_backend_info(folder, model.config, "torch", family.name, device, dtype, model.max_length)
    pad_id = model.config.get("pad_token_id")
    return EncoderBackend(network, 0 if pad_id is None else int(pad_id), model.tokenizer, info, settings)


@contextmanager
def transformers_load_errors(folder: Path, architecture: str) -> Iterator[None]:
    """Every way `transformers` reports a model it cannot load, as one ModelLoadError naming the folder."""
    try:
        yield
    except UnsupportedModelError as error:
        raise ModelLoadError(f"{folder}: {error}") from error
    except KeyError as error:
        raise ModelLoadError(f"{folder}: the model config lacks the required key {error}") from error
    # transformers reports a bad checkpoint (missing or misshapen tensors, unreadable files) as these.
    except (OSError, ValueError, RuntimeError) as error:
        raise ModelLoadError(f"{folder}: transformers could not load the {architecture}: {error}") from error
