"""`rerankd rerank-batch`: rerank a first-stage run (JSON lines or Parquet, one query and its candidates a
row) into a folder of part files, in this process or across a Ray cluster; a rerun resumes.

Exit codes: 0 when every shard is scored, 2 for a bad input, output folder or flag.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rerankd.catalog import DEFAULT_MODEL
from rerankd.cli.flags import add_settings_flags, positive, runtime_settings
from rerankd.settings import RuntimeSettings

if TYPE_CHECKING:
    from rerankd.distributed.bulk import BulkJob, ShardResult
    from rerankd.distributed.runfiles import Shard

logger = logging.getLogger("rerankd.rerank_batch")


def add_parser(commands: Any) -> None:
    batch = commands.add_parser(
        "rerank-batch",
        help="rerank a first-stage run file into part files, locally or across a Ray cluster (resumable)",
        description="Each input row is {query_id, query, candidates: [{doc_id, text}]}; each output row is "
        "{query_id, doc_id, rank, score}, scored and ranked as the server's /rerank does. The input is cut "
        "into shards of rows; each shard's part file is written whole, and a rerun into the same --output "
        "skips the shards already written.",
    )
    batch.add_argument(
        "--input", type=Path, required=True, help="a .jsonl or .parquet run, or a folder of them"
    )
    batch.add_argument("--output", type=Path, required=True, help="the folder of part files (made if absent)")
    batch.add_argument(
        "--format", choices=["jsonl", "parquet"], default=None, help="of the parts (default: the input's)"
    )
    batch.add_argument("--top-n", type=positive, default=None, help="keep each query's n best candidates")
    batch.add_argument("--raw-scores", action="store_true", help="the logit instead of its sigmoid")
    batch.add_argument(
        "--rows-per-shard", type=positive, default=1000, help="queries per part file (default: %(default)s)"
    )
    batch.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a progress bar in queries on standard error (default: when it is a terminal)",
    )
    ray = batch.add_argument_group("ray (scoring across a cluster: pip install 'rerankd[ray]')")
    ray.add_argument(
        "--address",
        default=None,
        help="the Ray cluster to score on (host:port of its head, `auto`, ray://...; default: RAY_ADDRESS); "
        "neither: score in this process, without Ray. Input and output must be on storage every node reaches",
    )
    ray.add_argument(
        "--workers",
        type=positive,
        default=None,
        help="engines at once (default: as the cluster's CPUs or GPUs hold)",
    )
    ray.add_argument("--cpus-per-worker", type=float, default=1.0, help="(default: %(default)s)")
    ray.add_argument("--gpus-per-worker", type=float, default=0.0, help="(default: %(default)s)")
    group = batch.add_argument_group("model")
    group.add_argument("--model", default=DEFAULT_MODEL, help="local folder or Hub id (default: %(default)s)")
    # No queue limit: the command's own queries are the only ones queued.
    add_settings_flags(group, RuntimeSettings, skip=["max_queued_pairs"])
    batch.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from rerankd.distributed.bulk import BulkJob, score_in_process
    from rerankd.distributed.cluster import missing_ray, ray_address
    from rerankd.distributed.runfiles import (
        RunFileError,
        claim_output,
        input_files,
        input_identity,
        part_path,
        plan_shards,
        run_format,
    )

    def fail(message: str) -> int:
        print(f"rerankd rerank-batch: {message}", file=sys.stderr)
        return 2

    address = ray_address(args.address)
    if address is not None and (problem := missing_ray()):
        return fail(problem)
    settings = runtime_settings(args).model_copy(update={"max_queued_pairs": None})
    try:
        files = input_files(args.input)
        fmt = args.format or run_format(files[0])
        shards = plan_shards(files, args.rows_per_shard)
        manifest = {
            "inputs": input_identity(files),
            "rows_per_shard": args.rows_per_shard,
            "format": fmt,
            "model": args.model,
            "scoring": {
                **settings.model_dump(mode="json", include={"revision", "backend", "dtype", "max_length"}),
                "raw_scores": args.raw_scores,
                "top_n": args.top_n,
            },
        }
        claim_output(args.output, manifest)
    except RunFileError as error:
        return fail(str(error))
    output = args.output.resolve()
    pending = [shard for shard in shards if not part_path(output, shard, fmt).exists()]
    logger.info(
        "%d shards, %d already written; scoring %d", len(shards), len(shards) - len(pending), len(pending)
    )
    job = BulkJob(args.model, settings.model_dump(mode="json"), str(output), fmt, args.raw_scores, args.top_n)
    rows = {shard.index: shard.rows for shard in shards}
    bar = tqdm(
        total=sum(rows.values()),
        initial=sum(rows.values()) - sum(shard.rows for shard in pending),
        unit="query",
        desc="rerank-batch",
        disable=not (sys.stderr.isatty() if args.progress is None else args.progress),
    )
    totals = {"queries": 0, "pairs": 0}

    def done(result: ShardResult) -> None:
        totals["queries"] += result.queries
        totals["pairs"] += result.pairs
        bar.update(rows[result.shard])

    started = time.perf_counter()
    try:
        if pending and address is None:
            score_in_process(job, pending, done)
        elif pending and address is not None:
            _score_on_cluster(address, job, pending, args, done)
    except ValueError as error:  # a bad row (`RunFileError`), or a cluster too small for one worker
        return fail(str(error))
    finally:
        bar.close()
    seconds = time.perf_counter() - started
    print(
        f"rerankd rerank-batch: {totals['queries']} queries ({totals['pairs']} pairs) scored in "
        f"{seconds:.1f}s into {len(pending)} parts; {output} holds all {len(shards)}",
        file=sys.stderr,
    )
    return 0


def _score_on_cluster(
    address: str,
    job: BulkJob,
    pending: list[Shard],
    args: argparse.Namespace,
    done: Callable[[ShardResult], None],
) -> None:
    """The shards scored by Ray Data on the cluster at `address`, disconnected from it afterwards."""
    from rerankd.distributed.cluster import connect

    connect(address)
    import ray

    from rerankd.distributed.bulk import score_on_ray
    from rerankd.distributed.scaling import WorkerResources

    try:
        resources = WorkerResources(args.workers, args.cpus_per_worker, args.gpus_per_worker)
        score_on_ray(job, pending, resources, done)
    finally:
        ray.shutdown()
