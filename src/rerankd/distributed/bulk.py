"""`rerankd rerank-batch`'s scoring: each shard of a first-stage run reranked by an engine loaded as
`rerankd serve` loads it, its queries scored as the server scores a request (`RerankEngine.score`: the same
tokenization, truncation and batching) and ranked as `/rerank` ranks them (`engine.postprocess.rank`), so a
row's score is the `relevance_score` the server answers for that query and candidate.

Shards are scored in this process, or on a Ray cluster by Ray Data's actors, one engine each, each writing
the parts of the shards it scores (on storage every node reaches); the driver only hears which shard is done.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rerankd.distributed.runfiles import QueryRow, RunFormat, Shard, part_path, read_shard, write_part
from rerankd.distributed.scaling import WorkerResources
from rerankd.engine.loader import load_engine
from rerankd.engine.postprocess import rank
from rerankd.settings import RuntimeSettings

# Queries of a shard scored at once: enough that the engine's batches fill across queries, few enough that
# their pairs stay a small queue.
QUERIES_IN_FLIGHT = 8


@dataclass(frozen=True)
class BulkJob:
    """What every scorer needs, in plain values (it travels to Ray's workers)."""

    model: str
    settings: dict[str, Any]  # RuntimeSettings, resolved once by the command
    output: str
    format: RunFormat
    raw_scores: bool = False
    top_n: int | None = None


@dataclass(frozen=True)
class ShardResult:
    shard: int
    queries: int
    pairs: int


class ShardScorer:
    """One engine, scoring shards and writing their parts. Ray Data calls it as a `map_batches` class, with
    batches of serialized shards (`Shard.to_json`)."""

    def __init__(self, job: BulkJob) -> None:
        self.job = job
        self.engine = load_engine(job.model, RuntimeSettings.model_validate(job.settings))
        self.engine.warm_up()
        # One event loop for the scorer's life: the engine's batch scheduler lives on it.
        self._runner = asyncio.Runner()

    def score(self, shard: Shard) -> ShardResult:
        rows = read_shard(shard)
        ranked, pairs = self._runner.run(self._ranked(rows))
        write_part(part_path(Path(self.job.output), shard, self.job.format), ranked)
        return ShardResult(shard.index, len(rows), pairs)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[int]]:
        results = [self.score(Shard.from_json(str(text))) for text in batch["shard"]]
        return {
            "shard": [result.shard for result in results],
            "queries": [result.queries for result in results],
            "pairs": [result.pairs for result in results],
        }

    async def _ranked(self, rows: Sequence[QueryRow]) -> tuple[list[dict[str, Any]], int]:
        """Every row's candidates ranked, rows in input order; and the (query, document) pairs scored."""
        gate = asyncio.Semaphore(QUERIES_IN_FLIGHT)

        async def ranked(row: QueryRow) -> tuple[list[dict[str, Any]], int]:
            if not row.documents:
                return [], 0
            async with gate:
                scored = await self.engine.score(row.query, row.documents)
            order = rank(scored.documents, raw_scores=self.job.raw_scores, top_n=self.job.top_n)
            return [
                {
                    "query_id": row.query_id,
                    "doc_id": row.doc_ids[item.index],
                    "rank": place,
                    "score": item.score,
                }
                for place, item in enumerate(order, start=1)
            ], scored.pair_count

        results = await asyncio.gather(*(ranked(row) for row in rows))
        return [line for lines, _ in results for line in lines], sum(pairs for _, pairs in results)

    def close(self) -> None:
        self._runner.close()
        self.engine.close()


def score_in_process(job: BulkJob, shards: Sequence[Shard], on_done: Callable[[ShardResult], None]) -> None:
    """The shards scored one after another by one engine in this process."""
    scorer = ShardScorer(job)
    try:
        for shard in shards:
            on_done(scorer.score(shard))
    finally:
        scorer.close()


def score_on_ray(
    job: BulkJob,
    shards: Sequence[Shard],
    resources: WorkerResources,
    on_done: Callable[[ShardResult], None],
) -> None:
    """The shards scored by a pool of Ray Data actors on the cluster `ray.init` connected to; a worker
    that dies has its shard retried by another (a part is only ever written whole)."""
    import ray

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the command shows one bar, in queries
    context.enable_operator_progress_bars = False
    workers = resources.count(ray.cluster_resources(), len(shards))
    items = [{"shard": shard.to_json()} for shard in shards]
    scored = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        ShardScorer,
        fn_constructor_args=(job,),
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=resources.cpus,
        num_gpus=resources.gpus,
    )
    for row in scored.iter_rows():
        on_done(ShardResult(int(row["shard"]), int(row["queries"]), int(row["pairs"])))
