"""The benchmark's workloads: a query with MS MARCO passages, and long documents near the 512-token limit."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rerankd.engine.tokenize import PairTokenizer
from rerankd.formats.tokenizer import load_tokenizer
from rerankd.quality.beir import BeirDataset, load_beir, query_with_passages


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


def make_workloads(
    data: Path, model_dir: Path, passages: int, long_documents: int, max_length: int = 512
) -> list[Workload]:
    dataset = load_beir(data)
    tokenizer = PairTokenizer(load_tokenizer(model_dir), max_length)
    return [
        passages_workload(dataset, tokenizer, passages),
        long_documents_workload(dataset, tokenizer, long_documents),
    ]


def short_warm_up(workload: Workload) -> Workload:
    """The workload's first 8 documents: enough to warm a server on a CPU, short enough not to cost."""
    return Workload("warm-up", workload.query, workload.documents[:8], workload.pair_lengths[:8])
