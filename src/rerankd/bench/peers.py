"""The peers rerankd is measured against, each scoring in process the way its users call it:
sentence-transformers' `CrossEncoder.rank` (the encoders), Qwen3-Reranker's model card code, and Mixedbread's
own `mxbai-rerank` package (mxbai-rerank-v2).

Every scorer returns relevance in input order on rerankd's scale (sigmoid of a logit, P("yes")), so the
report can compare their scores with rerankd's. Only the standard library is imported at the top: the
mxbai-rerank peer runs in that package's own virtual environment (it needs transformers 4.x), where rerankd's
dependencies are not installed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

Scorer = Callable[[str, list[str]], list[float]]


def _in_input_order(ranked: Iterable[tuple[int, float]], count: int) -> list[float]:
    """A ranking's (document index, score) pairs as the scores of the documents in input order."""
    scores = [0.0] * count
    for index, score in ranked:
        scores[index] = score
    return scores


def crossencoder(folder: str, dtype: str, device: str) -> Scorer:
    """sentence-transformers' CrossEncoder, its default activation (sigmoid for one label) included."""
    import torch
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(folder, device=device, model_kwargs={"dtype": getattr(torch, dtype)})

    def score(query: str, documents: list[str]) -> list[float]:
        ranked = model.rank(query, documents)
        return _in_input_order(
            ((entry["corpus_id"], float(entry["score"])) for entry in ranked), len(documents)
        )

    return score


class Qwen3Card:
    """Qwen3-Reranker as its model card scores it: `transformers`' causal LM, left padding, the card's system
    prompt and instruction, and P("yes") from the last token's logits over "yes" and "no"."""

    MAX_LENGTH = 8192

    def __init__(self, folder: str, dtype: Any, device: str = "cpu") -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from rerankd.modeling.causal import QWEN3_ASSISTANT, QWEN3_DEFAULT_INSTRUCTION, QWEN3_SYSTEM

        self.tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
        model: torch.nn.Module = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.yes = self.tokenizer.convert_tokens_to_ids("yes")
        self.no = self.tokenizer.convert_tokens_to_ids("no")
        self.prefix = self.tokenizer.encode(QWEN3_SYSTEM, add_special_tokens=False)
        self.suffix = self.tokenizer.encode(QWEN3_ASSISTANT, add_special_tokens=False)
        self.default_instruction = QWEN3_DEFAULT_INSTRUCTION

    def encode(self, query: str, documents: list[str], instruction: str | None = None) -> list[list[int]]:
        """The token ids of each pair, prompt included."""
        task = self.default_instruction if instruction is None else instruction
        texts = [f"<Instruct>: {task}\n<Query>: {query}\n<Document>: {document}" for document in documents]
        inputs = self.tokenizer(
            texts,
            padding=False,
            truncation="longest_first",
            return_attention_mask=False,
            max_length=self.MAX_LENGTH - len(self.prefix) - len(self.suffix),
        )
        return [self.prefix + ids + self.suffix for ids in inputs["input_ids"]]

    def score(self, query: str, documents: list[str], instruction: str | None = None) -> Any:
        """P("yes") of each pair, as a tensor in the model's dtype."""
        import torch

        batch = self.tokenizer.pad(
            {"input_ids": self.encode(query, documents, instruction)}, padding=True, return_tensors="pt"
        ).to(self.device)
        with torch.no_grad():
            logits = self.model(**batch).logits[:, -1, :]
        answers = torch.stack([logits[:, self.no], logits[:, self.yes]], dim=1)
        return answers.log_softmax(dim=1)[:, 1].exp()


def qwen3_card(folder: str, dtype: str, device: str) -> Scorer:
    import torch

    card = Qwen3Card(folder, getattr(torch, dtype), device)
    return lambda query, documents: card.score(query, documents).tolist()


def mxbai_rerank(folder: str, dtype: str, device: str) -> Scorer:
    """`mxbai_rerank.MxbaiRerankV2.rank` (its default batch of 32); it returns logits, relevance is their
    sigmoid."""
    import torch
    from mxbai_rerank import MxbaiRerankV2

    model = MxbaiRerankV2(folder, device=device, torch_dtype=getattr(torch, dtype))

    def score(query: str, documents: list[str]) -> list[float]:
        ranked = model.rank(query, documents, top_k=len(documents), return_documents=False)
        relevance = ((entry.index, 1 / (1 + math.exp(-entry.score))) for entry in ranked)
        return _in_input_order(relevance, len(documents))

    return score


SCORERS: dict[str, Callable[[str, str, str], Scorer]] = {
    "sentence-transformers": crossencoder,
    "qwen3-card": qwen3_card,
    "mxbai-rerank": mxbai_rerank,
}
