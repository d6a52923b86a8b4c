"""The files of `rerankd rerank-batch`: a first-stage run read a shard of rows at a time, and the reranked
run written one part file per shard, so that a run that stops part-way resumes where it stopped.

A run is JSON lines or Parquet (a file, or a folder of them), one row per query:
`{"query_id": "19335", "query": "...", "candidates": [{"doc_id": "7067032", "text": "..."}, ...]}`. The output
is a folder of `part-NNNNN.jsonl` or `.parquet` files, one row per (query, candidate) kept:
`{"query_id", "doc_id", "rank", "score"}`, ranked as the server ranks them; `_manifest.json` beside them says
which inputs and scoring settings the parts belong to.

Shards are cut from the input's own layout (lines of a JSON-lines file, rows of a Parquet file), the same on
every run of the same input, and each part is written to a temporary name and renamed when complete: a part
that exists is done, and a rerun skips its shard.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

RunFormat = Literal["jsonl", "parquet"]
SUFFIXES: dict[str, RunFormat] = {".jsonl": "jsonl", ".parquet": "parquet"}
# `_`: Parquet readers (pyarrow, Spark) skip such files when they read the folder as one table.
MANIFEST = "_manifest.json"
READ_BYTES = 1 << 24  # the JSON-lines scan for shard boundaries reads this much at a time


class RunFileError(ValueError):
    """An input or output that cannot be used as it is; the message names the file, row and problem."""


@dataclass(frozen=True)
class QueryRow:
    """One query of the first-stage run and its candidates, in the run's order."""

    query_id: str
    query: str
    doc_ids: list[str]
    documents: list[str]


@dataclass(frozen=True)
class Shard:
    """Rows `[first, first + rows)` of one input file: lines of a JSON-lines file (found from byte `start`
    to `stop`), or rows of a Parquet file (`start` and `stop` are then row numbers)."""

    index: int
    path: str
    format: RunFormat
    start: int
    stop: int
    first: int  # the shard's first line (1-based) or row (0-based) in its file, for error messages
    rows: int

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Shard:
        return cls(**json.loads(text))


def run_format(path: Path) -> RunFormat:
    try:
        return SUFFIXES[path.suffix]
    except KeyError:
        raise RunFileError(f"{path}: a run is a .jsonl or .parquet file (or a folder of them)") from None


def input_files(path: Path) -> list[Path]:
    """`path` itself, or the .jsonl and .parquet files of the folder `path`, in name order."""
    if path.is_dir():
        files = sorted(child for child in path.iterdir() if child.suffix in SUFFIXES and child.is_file())
        if not files:
            raise RunFileError(f"{path} holds no .jsonl or .parquet file")
        return [file.resolve() for file in files]
    if not path.is_file():
        raise RunFileError(f"{path} does not exist")
    run_format(path)
    return [path.resolve()]


def plan_shards(files: Sequence[Path], rows_per_shard: int) -> list[Shard]:
    """Every file cut into shards of `rows_per_shard` rows (a file's last shard may hold fewer)."""
    shards: list[Shard] = []
    for path in files:
        spans = _jsonl_spans(path, rows_per_shard) if run_format(path) == "jsonl" else None
        if spans is None:
            spans = _parquet_spans(path, rows_per_shard)
        for start, stop, first, rows in spans:
            shards.append(Shard(len(shards), str(path), run_format(path), start, stop, first, rows))
    return shards


def _jsonl_spans(path: Path, rows_per_shard: int) -> Iterator[tuple[int, int, int, int]]:
    """(byte start, byte stop, first line, lines) of each run of `rows_per_shard` lines."""
    start, offset, first, lines, last_byte = 0, 0, 1, 0, b"\n"
    with path.open("rb") as file:
        while chunk := file.read(READ_BYTES):
            position = 0
            while lines + chunk.count(b"\n", position) >= rows_per_shard:
                for _ in range(rows_per_shard - lines):
                    position = chunk.index(b"\n", position) + 1
                yield start, offset + position, first, rows_per_shard
                start, first, lines = offset + position, first + rows_per_shard, 0
            lines += chunk.count(b"\n", position)
            offset += len(chunk)
            last_byte = chunk[-1:]
    if offset > start:
        yield start, offset, first, lines + (last_byte != b"\n")


def _parquet_spans(path: Path, rows_per_shard: int) -> Iterator[tuple[int, int, int, int]]:
    import pyarrow.parquet as pq

    total = pq.ParquetFile(path).metadata.num_rows
    for start in range(0, total, rows_per_shard):
        stop = min(start + rows_per_shard, total)
        yield start, stop, start, stop - start


def read_shard(shard: Shard) -> list[QueryRow]:
    """The shard's queries; a row that is not a query with candidates raises `RunFileError` naming it."""
    if shard.format == "jsonl":
        with open(shard.path, "rb") as file:
            file.seek(shard.start)
            lines = file.read(shard.stop - shard.start).split(b"\n")
        rows = []
        for number, line in enumerate(lines, start=shard.first):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise RunFileError(f"{shard.path} line {number}: not JSON ({error.msg})") from None
            rows.append(_query_row(record, f"{shard.path} line {number}"))
        return rows
    import pyarrow.parquet as pq

    table = _parquet_rows(pq.ParquetFile(shard.path), shard.start, shard.stop)
    return [
        _query_row(record, f"{shard.path} row {row}")
        for row, record in enumerate(table.to_pylist(), start=shard.first)
    ]


def _parquet_rows(file: Any, start: int, stop: int) -> Any:
    """Rows `[start, stop)` of a Parquet file, reading only the row groups that hold them."""
    groups, first_row, row = [], None, 0
    for group in range(file.metadata.num_row_groups):
        count = file.metadata.row_group(group).num_rows
        if row + count > start and row < stop:
            groups.append(group)
            first_row = row if first_row is None else first_row
        row += count
    table = file.read_row_groups(groups, columns=["query_id", "query", "candidates"])
    return table.slice(start - (first_row or 0), stop - start)


def _query_row(record: Any, where: str) -> QueryRow:
    if not isinstance(record, Mapping):
        raise RunFileError(f"{where}: expected an object with query_id, query and candidates")
    query_id, query, candidates = record.get("query_id"), record.get("query"), record.get("candidates")
    if not isinstance(query_id, str | int) or isinstance(query_id, bool):
        raise RunFileError(f"{where}: query_id must be a string or an integer")
    if not isinstance(query, str):
        raise RunFileError(f"{where}: query must be a string")
    if not isinstance(candidates, list):
        raise RunFileError(f"{where}: candidates must be a list of {{doc_id, text}} objects")
    doc_ids, documents = [], []
    for position, candidate in enumerate(candidates):
        doc_id = candidate.get("doc_id") if isinstance(candidate, Mapping) else None
        text = candidate.get("text") if isinstance(candidate, Mapping) else None
        if not isinstance(doc_id, str | int) or isinstance(doc_id, bool) or not isinstance(text, str):
            raise RunFileError(
                f"{where}: candidates.{position} must be an object with a doc_id and a text string"
            )
        doc_ids.append(str(doc_id))
        documents.append(text)
    return QueryRow(str(query_id), query, doc_ids, documents)


def part_path(output: Path, shard: Shard, fmt: RunFormat) -> Path:
    return output / f"part-{shard.index:05d}.{fmt}"


def write_part(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """The part file, written whole under a temporary name and then renamed: it exists only complete."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if path.suffix == ".jsonl":
        with temporary.open("w", encoding="utf-8") as file:
            file.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema(
            [
                ("query_id", pa.string()),
                ("doc_id", pa.string()),
                ("rank", pa.int32()),
                ("score", pa.float64()),
            ]
        )
        pq.write_table(pa.Table.from_pylist(list(rows), schema=schema), temporary)
    os.replace(temporary, path)


def claim_output(output: Path, manifest: Mapping[str, Any]) -> None:
    """Make `output` the folder of this run: new, or one an earlier run of the same inputs and scoring
    settings (`manifest`) left, whose parts are then kept. Another run's folder raises `RunFileError`."""
    output.mkdir(parents=True, exist_ok=True)
    recorded = output / MANIFEST
    if recorded.is_file():
        earlier = json.loads(recorded.read_text())
        if earlier != manifest:
            changed = sorted(key for key in {*earlier, *manifest} if earlier.get(key) != manifest.get(key))
            raise RunFileError(
                f"{output} holds the parts of another run (its {', '.join(changed)} differ); "
                "give another --output, or remove it"
            )
        return
    if any(output.iterdir()):
        raise RunFileError(f"{output} is not empty and holds no {MANIFEST}: give an empty or new folder")
    recorded.write_text(json.dumps(manifest, indent=2) + "\n")


def input_identity(files: Sequence[Path]) -> list[dict[str, Any]]:
    """What tells a rerun that its input is the one the parts were made from: path, size, modification."""
    return [
        {"path": str(path), "bytes": path.stat().st_size, "modified_ns": path.stat().st_mtime_ns}
        for path in files
    ]
