"""LLM rerankers: causal language models that answer whether a document is relevant, scored from the logits
of the last token (Qwen3-Reranker's "yes"/"no", mxbai-rerank-v2's "1"/"0"), on `transformers`' own network.

Relevance is P(yes) over the two answers, softmax([no, yes])[1] = sigmoid(logit_yes - logit_no), so the
engine gets one logit per pair, `logit_yes - logit_no`, like every other family. Only the two answer rows of
the language-model head are multiplied, at each pair's last token: the full head over a 151k vocabulary
at every position would cost as much as several layers.

Each family's prompt is its model card's (Qwen3-Reranker) or its reference package's (`mxbai-rerank` on
PyPI for mxbai-rerank-v2): fixed texts, each tokenized on its own as the reference does, around a query
text and a document text. The pieces are cut where the reference's tokenization is unchanged by cutting:
after a ':' that a space follows, which Qwen's pre-tokenizer always splits.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedModel

QWEN3_DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
QWEN3_SYSTEM = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
    'Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
)
QWEN3_ASSISTANT = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
MXBAI_SYSTEM = (
    "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n"
)
MXBAI_TASK = (
    "You are a search relevance expert who evaluates how well documents match search queries. For each "
    "query-document pair, carefully analyze the semantic relationship between them, then provide your binary "
    "relevance judgment (0 for not relevant, 1 for relevant).\nRelevance:"
)
MXBAI_ASSISTANT = "<|im_end|>\n<|im_start|>assistant\n"


@dataclass(frozen=True)
class Prompt:
    """A family's input: `prefix` texts, the query text, `middle` texts, the document text, `suffix` texts;
    every text tokenized on its own, the ids put one after another. The query text holds the instruction
    (`instruction` formatted with it, or nothing when the request gives none and there is no default)."""

    prefix: tuple[str, ...]
    query: str  # with {instruction} and {query}
    query_tail: str  # the query text's end after {query}: kept when a long query is cut
    middle: tuple[str, ...]
    document: str  # with {document}
    suffix: tuple[str, ...]
    instruction: str  # with {instruction}
    default_instruction: str | None
    answers: tuple[str, str]  # the vocabulary's tokens for (yes, no)

    def query_text(self, query: str, instruction: str | None) -> str:
        chosen = self.default_instruction if instruction is None else instruction
        rendered = "" if chosen is None else self.instruction.format(instruction=chosen)
        return self.query.format(instruction=rendered, query=query)

    def document_text(self, document: str) -> str:
        return self.document.format(document=document)

    @property
    def document_offset(self) -> int:
        """Characters the document text puts before the document."""
        return self.document.index("{document}")


@dataclass(frozen=True)
class CausalFamily:
    name: str  # as `/info` reports it
    architecture: str  # config.json's `architectures[0]`
    prompt: Prompt


CAUSAL_FAMILIES: dict[str, CausalFamily] = {
    family.architecture: family
    for family in (
        CausalFamily(
            "qwen3-reranker",
            "Qwen3ForCausalLM",
            Prompt(
                prefix=(QWEN3_SYSTEM,),
                query="<Instruct>: {instruction}\n<Query>: {query}\n<Document>:",
                query_tail="\n<Document>:",
                middle=(),
                document=" {document}",
                suffix=(QWEN3_ASSISTANT,),
                instruction="{instruction}",
                default_instruction=QWEN3_DEFAULT_INSTRUCTION,
                answers=("yes", "no"),
            ),
        ),
        CausalFamily(
            "mxbai-rerank-v2",
            "Qwen2ForCausalLM",
            Prompt(
                prefix=(MXBAI_SYSTEM,),
                query="{instruction}query: {query}",
                query_tail="",
                middle=("\n", "document:"),
                document=" {document}",
                suffix=("\n", MXBAI_TASK, MXBAI_ASSISTANT),
                instruction="instruction: {instruction}\n",
                default_instruction=None,
                answers=("1", "0"),
            ),
        ),
    )
}


def causal_family(config: Mapping[str, Any]) -> CausalFamily | None:
    """The LLM reranker family config.json's architecture names, if it is one."""
    architectures = config.get("architectures") or []
    return CAUSAL_FAMILIES.get(architectures[0]) if architectures else None


class CausalReranker(nn.Module):
    """A `transformers` causal LM's body and the two answer rows of its head: for right-padded pairs,
    `logit_yes - logit_no` at each pair's last token. Right padding keeps every real token at the positions
    the reference's left padding gives it up to a shift, which rotary position embeddings do not see."""

    def __init__(self, language_model: PreTrainedModel, answer_ids: tuple[int, int]) -> None:
        super().__init__()
        self.body = language_model.get_decoder()
        head = language_model.get_output_embeddings()
        if head is None:
            raise ValueError("the model has no language-model head")
        self.answers = nn.Parameter(head.weight.detach()[list(answer_ids)].clone(), requires_grad=False)

    def relevance_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, lengths: torch.Tensor
    ) -> torch.Tensor:
        hidden = self.body(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths - 1]
        yes, no = (last @ self.answers.T).float().unbind(dim=1)
        return yes - no


def load_causal(
    folder: Path, answer_ids: tuple[int, int], dtype: torch.dtype, device: torch.device
) -> CausalReranker:
    """The folder's LLM reranker in `dtype` on `device`, in eval mode."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    language_model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    return CausalReranker(language_model, answer_ids).to(device).eval()
