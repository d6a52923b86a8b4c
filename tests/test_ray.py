"""Scaling out on Ray, on a real two-node cluster on loopback that the tests start and stop (raycluster.py):
`rerankd ray-serve` against a plain `rerankd serve` of the same model (every dialect, replicas sharing the
load, a replica killed under load), and `rerankd rerank-batch` on the DL19 subset's BM25 run against the
server's scores, resumed after a lost part. The run files' shards and the replica options are checked
without a cluster."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from rerankd.bench.processes import free_port, stop_process
from rerankd.distributed.runfiles import RunFileError, Shard, plan_shards, read_shard
from rerankd.distributed.scaling import ReplicaScaling

from raycluster import RayCluster, ray_cluster
from serving import run_cli, running_server, wait_until

NAME = "mixedbread-ai/mxbai-rerank-xsmall-v1"
QUERY = "Who wrote To Kill a Mockingbird?"
DOCUMENTS = [
    "To Kill a Mockingbird is a novel by Harper Lee.",
    "Moby-Dick was written by Herman Melville.",
    "Jane Austen wrote Pride and Prejudice.",
]
# One request per route and dialect, and one the route refuses (its error shape): compared whole between
# the two servers, but for the ids they make up.
DIALECT_REQUESTS = [
    ("/rerank", {"query": QUERY, "documents": DOCUMENTS, "return_documents": True}),
    ("/rerank", {"query": QUERY, "texts": DOCUMENTS, "return_text": True}),
    ("/rerank", {"model": "default/not-specified", "query": QUERY, "documents": DOCUMENTS}),
    ("/v1/rerank", {"query": QUERY, "documents": [{"text": text} for text in DOCUMENTS], "top_n": 2}),
    ("/v2/rerank", {"model": NAME, "query": QUERY, "documents": DOCUMENTS}),
    ("/v1/reranking", {"query": QUERY, "input": DOCUMENTS, "return_input": True}),
    ("/ai/v1/rerank", {"query": QUERY, "documents": DOCUMENTS}),
    ("/rerank", {"query": " ", "documents": DOCUMENTS}),
    ("/v2/rerank", {"query": QUERY, "documents": DOCUMENTS}),
    ("/rerank", {"query": QUERY, "documents": DOCUMENTS, "model": "no-such-model"}),
]
VOLATILE = {"id", "created"}  # made up per request, or the time the server started
SCORE_TOLERANCE = 1e-6  # the replicas' forward pass runs on 1 thread, the plain server's on 2
REPLICAS = 2
MAX_ONGOING = 4  # per replica: a killed replica loses at most this many requests
# The script that kills a replica's actor, as Ray's API does it, from a driver of its own.
KILL_REPLICA = """
import sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
named = ray.util.list_named_actors(all_namespaces=True)
[actor] = [a for a in named if a["name"].endswith("#" + sys.argv[2])]
ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
"""


def without_volatile(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: without_volatile(item) for key, item in value.items() if key not in VOLATILE}
    if isinstance(value, list):
        return [without_volatile(item) for item in value]
    return value


def assert_same_answer(ours: Any, theirs: Any, where: str = "") -> None:
    """Equal JSON, floats within SCORE_TOLERANCE."""
    if isinstance(ours, float) and isinstance(theirs, float):
        assert abs(ours - theirs) <= SCORE_TOLERANCE, f"{where}: {ours} != {theirs}"
    elif isinstance(ours, dict) and isinstance(theirs, dict):
        assert ours.keys() == theirs.keys(), where
        for key in ours:
            assert_same_answer(ours[key], theirs[key], f"{where}.{key}")
    elif isinstance(ours, list) and isinstance(theirs, list):
        assert len(ours) == len(theirs), where
        for index, (one, other) in enumerate(zip(ours, theirs, strict=True)):
            assert_same_answer(one, other, f"{where}.{index}")
    else:
        assert ours == theirs, f"{where}: {ours!r} != {theirs!r}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    """The two-node cluster every Ray test shares (installed by `make test`: the `ray` extra)."""
    pytest.importorskip("ray")
    with ray_cluster(tmp_path_factory.mktemp("ray-logs")) as started:
        yield started


@pytest.fixture(scope="module")
def plain_server(xsmall_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`rerankd serve` of the model, the reference every Ray answer is held to."""
    log = tmp_path_factory.mktemp("plain") / "serve.log"
    with running_server(["--model", str(xsmall_model_dir), "--served-model-name", NAME], log) as url:
        yield url


@dataclass(frozen=True)
class RayServed:
    url: str
    process: subprocess.Popen[bytes]


@dataclass(frozen=True)
class Outcome:
    started: float
    ended: float
    status: int | str  # the HTTP status, or the client's exception
    replica: str | None


def replica_of(response: httpx.Response) -> str:
    return response.headers["x-rerankd-replica"]


def rerank(
    url: str, query: str = QUERY, documents: list[str] = DOCUMENTS, timeout: float = 60
) -> httpx.Response:
    return httpx.post(f"{url}/rerank", json={"query": query, "documents": documents}, timeout=timeout)


@pytest.fixture(scope="class")  # stopped after the class: its replicas hold every CPU of the cluster
def ray_served(
    cluster: RayCluster, xsmall_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RayServed]:
    """`rerankd ray-serve` of the model on the cluster, as a user runs it; stopped by SIGTERM, which must
    delete the deployment and exit 0."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("ray-serve") / "ray-serve.log"
    command = [sys.executable, "-m", "rerankd", "ray-serve", "--address", cluster.address]
    command += ["--model", str(xsmall_model_dir), "--served-model-name", NAME, "--host", "127.0.0.1"]
    command += ["--port", str(port), "--num-replicas", str(REPLICAS), "--cpus-per-replica", "1"]
    command += ["--max-ongoing-requests", str(MAX_ONGOING), "--proxy-location", "HeadOnly"]
    url = f"http://127.0.0.1:{port}"
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=cluster.env)
    try:

        def deployed() -> bool:
            assert process.poll() is None, log_path.read_text()
            # The command logs this once `serve.run` has every replica running.
            return "serving on" in log_path.read_text()

        wait_until(deployed, seconds=240, poll_seconds=1)
        yield RayServed(url, process)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, log_path.read_text()
        assert "Deleting app" in log_path.read_text()
    finally:
        if process.poll() is None:
            stop_process(process)


@pytest.mark.slow
@pytest.mark.network
class TestRayServe:
    """Two replicas of `rerankd ray-serve`, one per node (each reserves the single CPU its node offers),
    behind Serve's proxy on the head."""

    def test_every_route_and_dialect_answers_as_plain_serve(
        self, ray_served: RayServed, plain_server: str
    ) -> None:
        for path in ("/health", "/ready", "/v1/models", "/openapi.json"):
            ours, theirs = (
                httpx.get(ray_served.url + path, timeout=30),
                httpx.get(plain_server + path, timeout=30),
            )
            assert ours.status_code == theirs.status_code == 200, path
            assert_same_answer(without_volatile(ours.json()), without_volatile(theirs.json()), path)
        for path, body in DIALECT_REQUESTS:
            ours = httpx.post(ray_served.url + path, json=body, timeout=60)
            theirs = httpx.post(plain_server + path, json=body, timeout=60)
            where = f"{path} {json.dumps(body)[:60]}"
            assert ours.status_code == theirs.status_code, where
            assert_same_answer(without_volatile(ours.json()), without_volatile(theirs.json()), where)
            assert ours.headers["x-request-id"] == ours.headers.get_list("x-request-id")[0], "one request id"
            assert replica_of(ours)

    def test_requests_are_spread_over_both_replicas(self, ray_served: RayServed) -> None:
        with ThreadPoolExecutor(8) as clients:
            answers = list(clients.map(lambda _: rerank(ray_served.url), range(32)))
        assert {response.status_code for response in answers} == {200}
        assert len(Counter(map(replica_of, answers))) == REPLICAS

    def test_a_replica_killed_under_load_loses_only_its_requests(
        self, ray_served: RayServed, cluster: RayCluster
    ) -> None:
        """Clients keep sending while one replica's actor is killed (`ray.kill`): every request ends, answered
        or refused with a 5xx (none hangs, no connection drops), at most that replica's in-flight requests
        fail (Serve's proxy may also retry them on the other), the other replica keeps answering, and Serve
        starts a replica in place of the dead one."""
        outcomes: list[Outcome] = []
        stop = threading.Event()

        def client() -> None:
            for _ in range(2000):  # bounded, however fast the answers come
                if stop.is_set():
                    return
                started = time.monotonic()
                try:
                    response = rerank(ray_served.url, timeout=60)
                    replica = response.headers.get("x-rerankd-replica")
                    outcomes.append(Outcome(started, time.monotonic(), response.status_code, replica))
                except httpx.HTTPError as error:  # a hang or a dropped connection: unclean
                    outcomes.append(Outcome(started, time.monotonic(), type(error).__name__, None))

        threads = [threading.Thread(target=client) for _ in range(6)]
        for thread in threads:
            thread.start()
        try:
            wait_until(
                lambda: len({outcome.replica for outcome in outcomes} - {None}) == REPLICAS, seconds=60
            )
            first = {outcome.replica for outcome in outcomes} - {None}
            # The busiest: the proxy fills the replica on its own node first, so that one has requests in
            # flight whenever clients are waiting.
            victim = Counter(o.replica for o in outcomes if o.replica).most_common(1)[0][0]
            kill_began = time.monotonic()
            killed = subprocess.run(
                [sys.executable, "-c", KILL_REPLICA, cluster.address, victim],
                capture_output=True,
                text=True,
                timeout=120,
                env=cluster.env,
            )
            assert killed.returncode == 0, killed.stderr
            killed_at = time.monotonic()

            def answered_after(seconds: float) -> list[Outcome]:
                return [o for o in outcomes if o.ended > killed_at + seconds and o.status == 200]

            wait_until(lambda: len(answered_after(1)) >= 20, seconds=90)
            # Serve's controller replaces the dead replica; its engine loads, then it takes its share.
            wait_until(lambda: any(o.replica not in first for o in answered_after(1)), seconds=150)
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=120)
        assert not any(thread.is_alive() for thread in threads), "a request hung"
        assert any(o.started < killed_at and o.ended > kill_began for o in outcomes), (
            "no load during the kill"
        )
        failed = [o for o in outcomes if o.status != 200]
        assert all(isinstance(o.status, int) and o.status >= 500 for o in failed), failed
        assert len(failed) <= MAX_ONGOING, failed
        assert victim not in {o.replica for o in answered_after(1)}
        assert first - {victim} <= {o.replica for o in answered_after(1)}  # the survivor kept answering


@pytest.fixture(scope="module")
def dl19_run(msmarco_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The DL19 subset's first stage as a run file: BM25's top 5 of each judged query (43 rows)."""
    from rerankd.quality.beir import load_judged_beir
    from rerankd.quality.bm25 import BM25Index

    data = load_judged_beir(msmarco_dir)
    passages, queries = data.dataset.passages, data.dataset.queries
    index = BM25Index(passages)
    path = tmp_path_factory.mktemp("dl19") / "bm25.jsonl"
    with path.open("w") as run:
        for query_id in data.query_ids:
            candidates = [{"doc_id": doc, "text": passages[doc]} for doc in index.top_k(queries[query_id], 5)]
            run.write(
                json.dumps({"query_id": query_id, "query": queries[query_id], "candidates": candidates})
            )
            run.write("\n")
    return path


def read_output(folder: Path) -> dict[str, list[dict[str, Any]]]:
    """query id -> its rows, best first, from every part of an output folder."""
    rows: dict[str, list[dict[str, Any]]] = {}
    for part in sorted(folder.glob("part-*.jsonl")):
        for line in part.read_text().splitlines():
            row = json.loads(line)
            rows.setdefault(row["query_id"], []).append(row)
    return rows


@pytest.mark.slow
@pytest.mark.network
@pytest.mark.timeout(400)
def test_rerank_batch_on_the_cluster_scores_as_the_server_and_resumes(
    cluster: RayCluster, plain_server: str, xsmall_model_dir: Path, dl19_run: Path, tmp_path: Path
) -> None:
    output = tmp_path / "reranked"
    args = ["--input", str(dl19_run), "--output", str(output), "--model", str(xsmall_model_dir)]
    args += ["--rows-per-shard", "8", "--progress"]
    on_cluster = run_cli(
        "rerank-batch", *args, "--address", cluster.address, "--workers", "2", env=cluster.env
    )
    assert on_cluster.returncode == 0, on_cluster.stderr
    assert "43/43" in on_cluster.stderr  # the progress bar, in queries
    parts = sorted(output.glob("part-*.jsonl"))
    assert len(parts) == 6  # 43 rows, 8 a shard
    reranked = read_output(output)
    run = [json.loads(line) for line in dl19_run.read_text().splitlines()]
    assert list(reranked) == [row["query_id"] for row in run]
    for row in run:
        answer = rerank(plain_server, row["query"], [c["text"] for c in row["candidates"]]).json()
        expected = [
            (row["candidates"][r["index"]]["doc_id"], r["relevance_score"]) for r in answer["results"]
        ]
        got = [(item["doc_id"], item["score"]) for item in reranked[row["query_id"]]]
        assert [doc for doc, _ in got] == [doc for doc, _ in expected], row["query_id"]
        assert max(abs(a - b) for (_, a), (_, b) in zip(got, expected, strict=True)) <= SCORE_TOLERANCE
        assert [item["rank"] for item in reranked[row["query_id"]]] == [1, 2, 3, 4, 5]

    # A run that stopped part-way: a part lost, a half-written one left behind. The rerun, here in process
    # (no Ray), scores that shard alone and leaves the others as they were.
    lost = parts[2].read_text()
    parts[2].unlink()
    (output / ".part-00002.jsonl.999.tmp").write_text('{"half": ')
    written = {part: part.stat().st_mtime_ns for part in parts if part.exists()}
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    resumed = subprocess.run(
        [sys.executable, "-m", "rerankd", "rerank-batch", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "6 shards, 5 already written; scoring 1" in resumed.stderr
    assert {part: part.stat().st_mtime_ns for part in written} == written
    assert_same_answer(
        [json.loads(line) for line in parts[2].read_text().splitlines()],
        [json.loads(line) for line in lost.splitlines()],
    )

    other_settings = run_cli("rerank-batch", *args, "--top-n", "3")
    assert other_settings.returncode == 2
    assert "scoring" in other_settings.stderr and "another run" in other_settings.stderr


@pytest.mark.slow
def test_rerank_batch_reads_and_writes_parquet_as_json_lines(xsmall_model_dir: Path, tmp_path: Path) -> None:
    """The same run as Parquet and as JSON lines, reranked in process: the same rows."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [
        {
            "query_id": str(number),
            "query": f"{QUERY} {number}",
            "candidates": [{"doc_id": f"d{index}", "text": text} for index, text in enumerate(DOCUMENTS)],
        }
        for number in range(5)
    ]
    (tmp_path / "run.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "run.parquet", row_group_size=2)
    for name in ("run.jsonl", "run.parquet"):
        done = run_cli(
            "rerank-batch",
            "--input",
            str(tmp_path / name),
            "--output",
            str(tmp_path / f"out-{name}"),
            "--model",
            str(xsmall_model_dir),
            "--rows-per-shard",
            "3",
            "--top-n",
            "2",
        )
        assert done.returncode == 0, done.stderr
    from_parquet = pq.read_table(tmp_path / "out-run.parquet").to_pylist()
    from_jsonl = [row for rows_ in read_output(tmp_path / "out-run.jsonl").values() for row in rows_]
    assert len(from_parquet) == 10
    assert_same_answer(sorted(from_parquet, key=lambda r: (int(r["query_id"]), r["rank"])), from_jsonl)


def test_json_lines_shards_cover_every_line_once(tmp_path: Path) -> None:
    lines = [
        json.dumps({"query_id": n, "query": "q", "candidates": [{"doc_id": n, "text": "t"}]})
        for n in range(7)
    ]
    run = tmp_path / "run.jsonl"
    run.write_text("\n".join(lines[:3]) + "\n\n" + "\n".join(lines[3:]))  # a blank line, no final newline
    shards = plan_shards([run], 3)
    assert [(shard.first, shard.rows) for shard in shards] == [(1, 3), (4, 3), (7, 2)]
    read = [row.query_id for shard in shards for row in read_shard(shard)]
    assert read == [str(n) for n in range(7)]
    assert Shard.from_json(shards[1].to_json()) == shards[1]


def test_a_bad_row_is_named_by_file_line_and_field(tmp_path: Path) -> None:
    run = tmp_path / "run.jsonl"
    good = {"query_id": "1", "query": "q", "candidates": [{"doc_id": "a", "text": "t"}]}
    bad = {**good, "candidates": [{"doc_id": "a", "text": "t"}, {"doc_id": "b", "text": None}]}
    run.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(RunFileError, match=r"run.jsonl line 2: candidates.1 must be"):
        read_shard(plan_shards([run], 10)[0])


def test_replica_scaling_becomes_serve_options() -> None:
    fixed = ReplicaScaling(num_replicas=3, gpus_per_replica=1).deployment_options(shutdown_timeout=30)
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1}
    assert fixed["graceful_shutdown_timeout_s"] == 30
    scaled = ReplicaScaling(min_replicas=1, max_replicas=4, target_ongoing_requests=6).deployment_options(30)
    assert scaled["autoscaling_config"] == {
        "min_replicas": 1,
        "max_replicas": 4,
        "initial_replicas": 1,
        "target_ongoing_requests": 6,
    }
    for invalid in ({"min_replicas": 2}, {"min_replicas": 5, "max_replicas": 4}, {"num_replicas": 0}):
        with pytest.raises(ValueError):
            ReplicaScaling(**invalid)
