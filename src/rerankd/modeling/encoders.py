"""Encoder cross-encoders run by `transformers`' own modeling: BERT, ELECTRA, RoBERTa/XLM-RoBERTa, ModernBERT.

A well-kept library beats a second copy of each network: these families' sequence classifiers are taken as
`transformers` ships them (its SDPA attention, its pooler and head), and only what the engine needs is
added here: which family a config.json names, what the family's pair template and position limit are, and
one relevance logit per pair. DeBERTa keeps the project's own network (`modeling/deberta.py`), which
measures several times faster than `transformers`' (BENCHMARKS.md: sentence-transformers runs that one).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from rerankd.modeling.config import UnsupportedModelError

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass(frozen=True)
class EncoderFamily:
    """What the engine must know of a family beyond its network."""

    name: str  # as `/info` reports it
    architecture: str  # config.json's `architectures[0]`
    middle_separators: int  # separator tokens between query and document in its pair template
    reserved_positions: bool  # RoBERTa's position ids start after the padding id (padding_idx + 1)

    def max_length(self, config: Mapping[str, Any]) -> int:
        """The longest pair its position embeddings cover."""
        positions = int(config["max_position_embeddings"])
        if self.reserved_positions:
            return positions - int(config.get("pad_token_id", 1)) - 1
        return positions


def reads_token_types(config: Mapping[str, Any]) -> bool:
    """Whether the network adds a token type embedding that differs between a pair's two segments."""
    return int(config.get("type_vocab_size", 0)) > 1


ENCODER_FAMILIES: dict[str, EncoderFamily] = {
    family.architecture: family
    for family in (
        EncoderFamily("bert", "BertForSequenceClassification", 1, False),
        EncoderFamily("electra", "ElectraForSequenceClassification", 1, False),
        EncoderFamily("roberta", "RobertaForSequenceClassification", 2, True),
        EncoderFamily("xlm-roberta", "XLMRobertaForSequenceClassification", 2, True),
        EncoderFamily("modernbert", "ModernBertForSequenceClassification", 1, False),
    )
}


def encoder_family(config: Mapping[str, Any]) -> EncoderFamily | None:
    """The family config.json's architecture names, if it is one of these encoders."""
    architectures = config.get("architectures") or []
    return ENCODER_FAMILIES.get(architectures[0]) if architectures else None


class EncoderReranker(nn.Module):
    """A `transformers` sequence classifier that returns one relevance logit per pair: its logit for one
    label, and for two labels the difference label 1 minus label 0, whose sigmoid is softmax's label 1."""

    def __init__(self, classifier: PreTrainedModel, family: EncoderFamily, token_types: bool) -> None:
        super().__init__()
        self.classifier = classifier
        self.family = family
        self.token_types = token_types
        labels = classifier.config.num_labels
        if labels not in (1, 2):
            raise UnsupportedModelError(f"the classifier has {labels} labels; a reranker has 1 or 2")
        self.labels = labels

    def relevance_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None
    ) -> torch.Tensor:
        extra = {"token_type_ids": token_type_ids} if self.token_types else {}
        logits = self.classifier(input_ids=input_ids, attention_mask=attention_mask, **extra).logits.float()
        return logits[:, 0] if self.labels == 1 else logits[:, 1] - logits[:, 0]


def load_encoder(
    folder: Path, family: EncoderFamily, dtype: torch.dtype, device: torch.device
) -> EncoderReranker:
    """The folder's classifier in `dtype` on `device`, in eval mode (dropout off)."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # a server's log gets lines, not progress bars
    classifier = AutoModelForSequenceClassification.from_pretrained(folder, dtype=dtype).to(device).eval()
    return EncoderReranker(classifier, family, reads_token_types(classifier.config.to_dict()))
