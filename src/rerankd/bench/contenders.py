"""How each contender is started and measured: rerankd's server (on the torch backend, or on a GGUF through
llama.cpp), the in-process peers (`rerankd.bench.peers`: sentence-transformers, Qwen3-Reranker's card code,
mxbai-rerank) in a worker process each, and Infinity.

Every one gets a random-weight model at a real geometry with a real tokenizer, a warm-up (one short call on a
CPU, each workload once on a GPU), then timed calls; each driver also records its process's peak RSS.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

import rerankd
from rerankd.bench.flops import CountedFlops, pair_flops
from rerankd.bench.measure import Measurement, mean
from rerankd.bench.processes import free_port, running_process
from rerankd.bench.results import LLAMACPP_CONTENDER, RERANKD_FLOAT32, RERANKD_PINNED, Fairness
from rerankd.bench.served import http_measure, measure_fairness, served_scores, warm_up
from rerankd.bench.settings import BenchSettings, Peer
from rerankd.bench.workloads import Workload, short_warm_up
from rerankd.modeling.config import DebertaConfig

logger = logging.getLogger(__name__)

# What Infinity computes in: its default (`auto`) on each device, named so its share of a ceiling is found.
INFINITY_DTYPES = {"cpu": "float32", "cuda": "float16"}
# What llama.cpp's weight types compute in, to find the matmul ceiling they are measured against.
GGUF_COMPUTE_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


@dataclass(frozen=True)
class BenchModel:
    """A model every contender of one section runs: its transformers folder (tokenizer for the workloads;
    what the peers and Infinity load) and, per rerankd contender, what `rerankd serve --model` gets with
    which flags."""

    family: str  # as `/info` names it
    title: str
    folder: Path
    shape: dict[str, int]
    flops: Callable[[int], int]  # per pair of this many tokens
    servings: dict[str, tuple[Path, tuple[str, ...]]]

    @classmethod
    def deberta(cls, geometry: str, folder: Path) -> BenchModel:
        config = DebertaConfig.from_dict(json.loads((folder / "config.json").read_text()))
        return cls(
            "deberta-v2",
            geometry,
            folder,
            {
                "hidden": config.hidden_size,
                "layers": config.num_hidden_layers,
                "heads": config.num_attention_heads,
            },
            lambda length: pair_flops(config, length).total,
            {
                RERANKD_FLOAT32: (folder, ("--dtype", "float32")),
                "rerankd": (folder, ()),
                **{f"rerankd {dtype}": (folder, ("--dtype", dtype)) for dtype in RERANKD_PINNED.values()},
            },
        )

    @classmethod
    def transformers(cls, family: str, title: str, folder: Path, gguf_path: Path | None = None) -> BenchModel:
        """A model `transformers` runs, on rerankd's torch backend and, with `gguf_path`, the same weights
        on its llama.cpp backend."""
        config = json.loads((folder / "config.json").read_text())
        servings: dict[str, tuple[Path, tuple[str, ...]]] = {"rerankd": (folder, ())}
        if gguf_path is not None:
            servings[LLAMACPP_CONTENDER] = (gguf_path, ("--backend", "llamacpp"))
        return cls(
            family,
            title,
            folder,
            {
                "hidden": int(config["hidden_size"]),
                "layers": int(config["num_hidden_layers"]),
                "heads": int(config["num_attention_heads"]),
            },
            CountedFlops(folder),
            servings,
        )

    def mean_flops(self, workload: Workload) -> float:
        """Model FLOPs per pair of `workload`, averaged over its pairs: what a pairs/s rate is worth."""
        return mean([float(self.flops(length)) for length in workload.pair_lengths])


def _measure_server(
    settings: BenchSettings,
    contender: str,
    dtype: str,
    url: str,
    model: BenchModel,
    workloads: list[Workload],
    served_name: str | None = None,
    concurrent: bool = True,
) -> list[Measurement]:
    """Warm up, then every workload from one client and, if `concurrent`, the first from `settings.clients`
    at once."""
    warm_up(url, settings.warm_ups(workloads), served_name)
    runs = [(workload, 1) for workload in workloads]
    if concurrent:
        runs.append((workloads[0], settings.clients))
    return [
        http_measure(
            settings, contender, dtype, url, workload, clients, served_name, model.mean_flops(workload)
        )
        for workload, clients in runs
    ]


def _log(settings: BenchSettings, contender: str, model: BenchModel) -> Path:
    name = "".join(c if c.isalnum() or c in "-." else "-" for c in f"{contender}-{model.title}")
    return settings.log_dir / f"{name}.log"


def _serve_command(
    settings: BenchSettings, model: BenchModel, contender: str, port: int, *flags: str
) -> list[str]:
    served, serve_flags = model.servings[contender]
    command = [sys.executable, "-m", "rerankd", "serve", "--model", str(served), "--port", str(port)]
    return [*command, "--device", settings.device, *serve_flags, *flags]


@dataclass
class ServedRun:
    measurements: list[Measurement]
    scores: list[float]  # for the first workload, in input order
    fairness: Fairness | None = None


def bench_rerankd(
    settings: BenchSettings,
    model: BenchModel,
    contender: str,
    workloads: list[Workload],
    big: Workload | None = None,
    concurrent: bool = True,
) -> ServedRun:
    """rerankd as `contender` over HTTP; with `big`, also the fairness of small requests next to it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = _serve_command(
        settings, model, contender, port, "--max-documents", str(max(settings.big_request, settings.passages))
    )
    log = _log(settings, contender, model)
    with running_process(command, url, log, env={"HF_HUB_OFFLINE": "1"}, ready_path="/ready") as server:
        info = httpx.get(f"{url}/info").json()["models"][0]
        dtype = GGUF_COMPUTE_DTYPES.get(info["dtype"], info["dtype"])
        run = ServedRun(
            _measure_server(
                settings, contender, dtype, f"{url}/rerank", model, workloads, concurrent=concurrent
            ),
            served_scores(f"{url}/rerank", workloads[0]),
        )
        if big is not None:
            small = Workload(
                "small",
                workloads[0].query,
                workloads[0].documents[: settings.small_request],
                workloads[0].pair_lengths[: settings.small_request],
            )
            run.fairness = measure_fairness(url, small, big, settings)
        peak = server.peak_rss()
    for measurement in run.measurements:
        measurement.peak_rss = peak
    return run


def rerankd_bf16_peak_rss(settings: BenchSettings, model: BenchModel, workload: Workload) -> int | None:
    """Peak RSS of `rerankd serve --dtype bfloat16` after loading and scoring 8 of the workload's texts."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = _serve_command(settings, model, "rerankd", port, "--dtype", "bfloat16")
    log = _log(settings, "rerankd-bf16", model)
    with running_process(command, url, log, env={"HF_HUB_OFFLINE": "1"}, ready_path="/ready") as server:
        warm_up(f"{url}/rerank", [short_warm_up(workload)], None)
        return server.peak_rss()


def bench_infinity(
    settings: BenchSettings, model: BenchModel, workloads: list[Workload]
) -> list[Measurement]:
    assert settings.infinity is not None
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        str(settings.infinity),
        "v2",
        "--model-id",
        str(model.folder),
        "--served-model-name",
        "bench",
        "--engine",
        "torch",
        "--device",
        settings.device,
        "--dtype",
        INFINITY_DTYPES[settings.device],
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-bettertransformer",
        "--no-model-warmup",
    ]
    log = _log(settings, "infinity", model)
    with running_process(command, url, log, env={"DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"}) as server:
        measurements = _measure_server(
            settings, "infinity", INFINITY_DTYPES[settings.device], f"{url}/rerank", model, workloads, "bench"
        )
        peak = server.peak_rss()
    for measurement in measurements:
        measurement.peak_rss = peak
    return measurements


def _peer_python(settings: BenchSettings, peer: Peer) -> tuple[str, dict[str, str]]:
    """The Python a peer runs in and its environment: rerankd's own, or the peer's virtual environment with
    rerankd's source on its path (the worker and the scorers import nothing else of rerankd)."""
    python = settings.peer_pythons.get(peer.scorer)
    if python is None:
        return sys.executable, dict(os.environ)
    source = str(Path(rerankd.__file__).parents[1])
    return str(python), {**os.environ, "PYTHONPATH": source, "HF_HUB_OFFLINE": "1"}


def bench_peer(
    settings: BenchSettings, model: BenchModel, workloads: list[Workload], peer: Peer
) -> tuple[list[Measurement], list[float]]:
    """A peer in a process of its own; also its scores for the first workload."""
    spec = {
        "scorer": peer.scorer,
        "model": str(model.folder),
        "dtype": peer.dtype,
        "device": settings.device,
        "max_requests": settings.requests_per_client(1),
        "max_seconds": settings.max_seconds,
        "warm_ups": [{"query": w.query, "documents": w.documents} for w in settings.warm_ups(workloads)],
        "workloads": [{"name": w.name, "query": w.query, "documents": w.documents} for w in workloads],
    }
    python, env = _peer_python(settings, peer)
    with tempfile.NamedTemporaryFile("w", suffix=".json") as spec_file:
        json.dump(spec, spec_file)
        spec_file.flush()
        log = _log(settings, peer.contender, model)
        with log.open("w") as log_file:
            completed = subprocess.run(
                [python, "-m", "rerankd.bench.peer_worker", spec_file.name],
                stdout=subprocess.PIPE,
                stderr=log_file,
                text=True,
                check=False,
                env=env,
            )
    if completed.returncode != 0:
        raise RuntimeError(f"{peer.contender} worker failed ({completed.returncode}); see {log}")
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    measurements = []
    for workload, run in zip(workloads, report["runs"], strict=True):
        measurements.append(
            Measurement(
                peer.contender,
                peer.dtype,
                workload.name,
                1,
                run["latencies"],
                len(run["latencies"]) * len(workload.documents),
                run["seconds"],
                report["peak_rss"],
                model.mean_flops(workload),
            )
        )
        logger.info("%s %s: %.2f pairs/s", peer.contender, workload.name, measurements[-1].pairs_per_second)
    return measurements, report["scores"]
