"""The benchmark's workloads: a query with MS MARCO passages, and long documents near the 512-token limit,
measured in the tokens each model's pairs have as rerankd serves them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rerankd.backends.folder_model import read_folder_model
from rerankd.engine.tokenize import PairTokenizer
from rerankd.quality.beir import BeirDataset, query_with_passages
from rerankd.settings import DEFAULT_BATCH_TOKENS

# DeBERTa-v3's positions: the mxbai-rerank-v1 models' limit.
DEBERTA_MAX_LENGTH = 512


@dataclass(frozen=True)
class Workload:
    name: str
    query: str
    documents: list[str]
    pair_lengths: list[int]  # tokens per (query, document) pair after truncation, as the model sees them

    @property
    def mean_tokens(self) -> float:
        return sum(self.pair_lengths) / len(self.pair_lengths)


def _measured(name: str, query: str, documents: list[str], tokenizer: PairTokenizer) -> Workload:
    lengths = tokenizer.encode_pairs(query, documents).lengths
    return Workload(name, query, documents, lengths)


def passages_workload(dataset: BeirDataset, tokenizer: PairTokenizer, count: int) -> Workload:
    """The first judged query with `count` passages: its judged ones, then others from the corpus."""
    query_id = dataset.judged_query_ids()[0]
    documents = [dataset.passages[pid] for pid in query_with_passages(dataset, query_id, count)]
    return _measured(f"{count} passages", dataset.queries[query_id], documents, tokenizer)


def long_documents_workload(
    dataset: BeirDataset, tokenizer: PairTokenizer, count: int, min_tokens: int = 480
) -> Workload:
    """`count` documents made of consecutive corpus passages, each long enough to reach ~`min_tokens`."""
    query_id = dataset.judged_query_ids()[0]
    query = dataset.queries[query_id]
    passages = iter(dataset.passages.values())
    documents = []
    for _ in range(count):
        parts = [next(passages)]
        while tokenizer.encode_pairs(query, [" ".join(parts)]).longest < min_tokens:
            parts.append(next(passages))
        documents.append(" ".join(parts))
    return _measured(f"{count} long documents", query, documents, tokenizer)


def served_pair_tokenizer(folder: Path, device: str = "cpu") -> PairTokenizer:
    """The folder's pairs as `rerankd serve` builds them by default: its family's template (an LLM reranker's
    prompt), truncated to the model's limit or the device's batch token budget, whichever is shorter."""
    model = read_folder_model(folder)
    return PairTokenizer(model.tokenizer, min(model.max_length, DEFAULT_BATCH_TOKENS[device]), model.prompt)


def make_workloads(
    dataset: BeirDataset, tokenizer: PairTokenizer, passages: int, long_documents: int
) -> list[Workload]:
    return [
        passages_workload(dataset, tokenizer, passages),
        long_documents_workload(dataset, tokenizer, long_documents),
    ]


def short_warm_up(workload: Workload) -> Workload:
    """The workload's first 8 documents: enough to warm a server on a CPU, short enough not to cost."""
    return Workload("warm-up", workload.query, workload.documents[:8], workload.pair_lengths[:8])
