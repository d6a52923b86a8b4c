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


class BeirError(ValueError):
    """A BEIR folder that cannot be evaluated as it is; the message names the file, line and problem."""


@dataclass(frozen=True)
class JudgedBeir:
    """A BEIR folder read for evaluation, where every judgment must be accounted for (unlike `load_beir`,
    which samples passages and may skip what it cannot use)."""

    dataset: BeirDataset  # passages are title and text joined, as BEIR's retrievers and rerankers see them
    qrels: Path
    absent: list[tuple[str, str]]  # (query id, corpus id) of judgments naming documents not in the corpus
    query_ids: list[str]  # judged queries with a relevant (label >= 1) document in the corpus, qrels order

    def warnings(self) -> list[str]:
        """What was left out, for the user to judge whether the numbers still mean what they expect."""
        notes = []
        if self.absent:
            query_id, corpus_id = self.absent[0]
            notes.append(
                f"{len(self.absent)} judgments in {self.qrels} name documents absent from corpus.jsonl "
                f"(first: query {query_id!r}, document {corpus_id!r}); they are left out, so recall counts "
                "only the relevant documents of the corpus"
            )
        unanswerable = len(self.dataset.judgments) - len(self.query_ids)
        if unanswerable:
            notes.append(
                f"{unanswerable} judged queries have no relevant (label >= 1) document in corpus.jsonl; "
                "they are left out"
            )
        return notes


def load_judged_beir(folder: Path, split: str = "test") -> JudgedBeir:
    """Read a BEIR folder strictly: a malformed line, a judgment of an unknown query or a judged query with
    empty text raises BeirError; judgments of documents absent from the corpus (common in subsets) are
    counted and left out."""
    if not folder.is_dir():
        raise BeirError(f"{folder} is not a directory")
    passages = _read_texts(folder / "corpus.jsonl", with_titles=True)
    if not passages:
        raise BeirError(f"{folder / 'corpus.jsonl'} holds no documents")
    queries_path = folder / "queries.jsonl"
    queries = _read_texts(queries_path, with_titles=False)
    qrels = folder / "qrels" / f"{split}.tsv"
    judgments, absent = _read_qrels(qrels, queries_path, queries, passages)
    for query_id in judgments:
        if not queries[query_id].strip():
            raise BeirError(f"{queries_path}: judged query {query_id!r} has empty text")
    query_ids = [qid for qid, labels in judgments.items() if any(label >= 1 for label in labels.values())]
    if not query_ids:
        raise BeirError(f"{qrels}: no judged query has a relevant (label >= 1) document in corpus.jsonl")
    dataset = BeirDataset(folder.name, passages, queries, judgments)
    return JudgedBeir(dataset, qrels, absent, query_ids)


def _read_texts(path: Path, with_titles: bool) -> dict[str, str]:
    """id -> text of a BEIR JSON-lines file (`title` joined before `text` when asked)."""
    if not path.is_file():
        raise BeirError(f"{path} does not exist")
    texts: dict[str, str] = {}
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise BeirError(f"{path} line {number}: not JSON ({error.msg})") from None
            if not isinstance(row, dict) or "_id" not in row or not isinstance(row.get("text"), str):
                raise BeirError(f'{path} line {number}: expected an object with "_id" and a "text" string')
            title = row.get("title") if with_titles else None
            texts[str(row["_id"])] = (
                f"{title} {row['text']}".strip() if isinstance(title, str) else row["text"]
            )
    return texts


def _read_qrels(
    path: Path, queries_path: Path, queries: dict[str, str], passages: dict[str, str]
) -> tuple[dict[str, dict[str, int]], list[tuple[str, str]]]:
    """Judgments of known documents, and the (query id, corpus id) of those naming absent documents."""
    if not path.is_file():
        present = sorted(p.name for p in path.parent.glob("*.tsv")) if path.parent.is_dir() else []
        raise BeirError(
            f"{path} does not exist" + (f" ({path.parent} has {', '.join(present)})" if present else "")
        )
    judgments: dict[str, dict[str, int]] = {}
    absent: list[tuple[str, str]] = []
    unknown: dict[str, int] = {}  # query id -> first line naming it
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        fields = [field.strip() for field in line.split("\t")]
        if len(fields) != 3:
            raise BeirError(
                f"{path} line {number}: expected 3 tab-separated fields (query-id, corpus-id, score), "
                f"got {len(fields)}"
            )
        try:
            label = int(fields[2])
        except ValueError:
            if number == 1:
                continue  # the header line (query-id, corpus-id, score)
            raise BeirError(f"{path} line {number}: score {fields[2]!r} is not an integer") from None
        query_id, corpus_id = fields[0], fields[1]
        if query_id not in queries:
            unknown.setdefault(query_id, number)
            continue
        labels = judgments.setdefault(query_id, {})  # even if none of its documents is in the corpus
        if corpus_id in passages:
            labels[corpus_id] = label
        else:
            absent.append((query_id, corpus_id))
    if unknown:
        query_id, number = next(iter(unknown.items()))
        others = f" (and {len(unknown) - 1} other unknown query ids)" if len(unknown) > 1 else ""
        raise BeirError(f"{path} line {number}: query id {query_id!r} is not in {queries_path}{others}")
    return judgments, absent
