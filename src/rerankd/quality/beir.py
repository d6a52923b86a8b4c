"""BEIR-format retrieval data: corpus.jsonl, queries.jsonl and qrels/test.tsv (with or without a header)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BeirDataset:
    name: str
    passages: dict[str, str]  # corpus id -> text
    queries: dict[str, str]  # query id -> text
    judgments: dict[str, dict[str, int]]  # query id -> {corpus id: graded label}

    def judged_query_ids(self) -> list[str]:
        """Queries with at least one judged passage in the corpus, in a stable order."""
        return sorted(query_id for query_id, labels in self.judgments.items() if labels)


def load_beir(folder: Path, split: str = "test") -> BeirDataset:
    """Read a BEIR folder; qrels lines naming unknown queries or passages are skipped."""
    with (folder / "corpus.jsonl").open() as corpus:
        passages = {str(row["_id"]): row["text"] for row in map(json.loads, corpus)}
    with (folder / "queries.jsonl").open() as queries_file:
        queries = {str(row["_id"]): row["text"] for row in map(json.loads, queries_file)}
    judgments: dict[str, dict[str, int]] = {}
    for line in (folder / "qrels" / f"{split}.tsv").read_text().splitlines():
        fields = line.split("\t")
        if len(fields) < 3 or not fields[2].strip().lstrip("-").isdigit():
            continue  # the header line, or a blank one
        query_id, corpus_id, label = fields[0], fields[1], int(fields[2])
        if query_id in queries and corpus_id in passages:
            judgments.setdefault(query_id, {})[corpus_id] = label
    return BeirDataset(folder.name, passages, queries, judgments)


def query_with_passages(dataset: BeirDataset, query_id: str, count: int, offset: int = 0) -> list[str]:
    """Up to `count` passage ids for a query: its judged ones first (at most half), then corpus fillers."""
    chosen = list(dataset.judgments.get(query_id, {}))[: count // 2]
    fillers = [pid for pid in list(dataset.passages)[offset : offset + count] if pid not in chosen]
    return (chosen + fillers)[:count]
