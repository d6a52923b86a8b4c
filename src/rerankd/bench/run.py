"""`rerankd bench`: rerankd and its peers on the same model and workloads, in one run, on one machine.

Contenders: rerankd over HTTP (1 client and N concurrent clients), sentence-transformers `CrossEncoder.rank`
in fp32 and bf16 in a process of its own, and Infinity (`infinity-emb`) over HTTP. Every one gets the same
random-weight model at a real geometry with the real tokenizer, one warm-up call, then timed calls.
"""

from __future__ import annotations

import datetime
import json
import logging
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch

from rerankd.bench.flops import pair_flops
from rerankd.bench.machine import describe_machine, matmul_gflops
from rerankd.bench.measure import Measurement, http_load, mean, percentile, rerank_sender, timed_requests
from rerankd.bench.processes import free_port, running_process
from rerankd.bench.workloads import Workload, make_workloads, passages_workload
from rerankd.engine.tokenize import PairTokenizer
from rerankd.formats.tokenizer import load_tokenizer
from rerankd.modeling.config import DebertaConfig
from rerankd.quality.beir import load_beir

logger = logging.getLogger(__name__)

CROSSENCODER_DTYPES = {"st-fp32": "float32", "st-bf16": "bfloat16"}
CONTENDERS = ("rerankd", *CROSSENCODER_DTYPES, "infinity")


@dataclass(frozen=True)
class BenchSettings:
    data: Path
    models: dict[str, Path]  # geometry -> random-weight model folder
    contenders: tuple[str, ...] = CONTENDERS
    infinity: Path | None = None  # the `infinity_emb` executable (its own virtual environment)
    passages: int = 64
    long_documents: int = 16
    max_requests: int = 3
    max_seconds: float = 60.0
    clients: int = 8
    big_request: int = 1000
    small_request: int = 10
    small_requests: int = 10
    log_dir: Path = Path("bench-logs")


@dataclass
class Fairness:
    """Latency of small requests alone and while one big request is being scored."""

    alone_p95: float
    during_p95: float
    during_count: int
    big_seconds: float

    @property
    def ratio(self) -> float:
        return self.during_p95 / self.alone_p95


@dataclass
class GeometryResult:
    geometry: str
    config: dict[str, int]
    workloads: list[dict[str, float | str]]
    measurements: list[Measurement] = field(default_factory=list)
    fairness: Fairness | None = None
    bf16_peak_rss: int | None = None  # rerankd serving the model in bfloat16: load plus one small request


@dataclass
class BenchResult:
    date: str
    command: str
    machine: dict[str, object]
    ceilings: dict[str, float]  # dtype -> matmul GFLOP/s
    geometries: list[GeometryResult]


def _flops(config: DebertaConfig, workload: Workload) -> float:
    return mean([float(pair_flops(config, length).total) for length in workload.pair_lengths])


def _body(workload: Workload, model: str | None = None) -> dict[str, object]:
    body: dict[str, object] = {"query": workload.query, "documents": workload.documents}
    if model is not None:
        body["model"] = model
    return body


def _warm_up(url: str, workload: Workload, model: str | None) -> None:
    warm = Workload("warm-up", workload.query, workload.documents[:8], workload.pair_lengths[:8])
    httpx.post(url, json=_body(warm, model), timeout=600).raise_for_status()


def _http_measure(
    settings: BenchSettings,
    contender: str,
    dtype: str,
    url: str,
    workload: Workload,
    clients: int,
    model: str | None,
    flops: float,
) -> Measurement:
    requests = settings.max_requests if clients == 1 else 1
    latencies, done, seconds = http_load(url, _body(workload, model), clients, requests, settings.max_seconds)
    logger.info(
        "%s %s, %d client(s): %.2f pairs/s",
        contender,
        workload.name,
        clients,
        done * len(workload.documents) / seconds,
    )
    return Measurement(
        contender,
        dtype,
        workload.name,
        clients,
        latencies,
        done * len(workload.documents),
        seconds,
        mean_flops=flops,
    )


def _fairness(url: str, small: Workload, big: Workload, settings: BenchSettings) -> Fairness:
    """p95 of small requests alone, then while one big request is queued and running."""
    with httpx.Client(timeout=3600) as client:
        send_small = rerank_sender(client, url, _body(small))
        alone = timed_requests(send_small, settings.small_requests, settings.max_seconds)
        big_done = threading.Event()
        big_seconds = [0.0]

        def send_big() -> None:
            with httpx.Client(timeout=3600) as big_client:
                started = time.perf_counter()
                rerank_sender(big_client, url, _body(big))()
                big_seconds[0] = time.perf_counter() - started
                big_done.set()

        thread = threading.Thread(target=send_big)
        thread.start()
        time.sleep(0.5)  # let the big request's pairs reach the queue first
        during: list[float] = []
        while not big_done.is_set() and len(during) < 10 * settings.small_requests:
            during += timed_requests(send_small, 1, settings.max_seconds)
        thread.join()
    return Fairness(percentile(alone, 95), percentile(during, 95), len(during), big_seconds[0])


def _serve_command(settings: BenchSettings, geometry: str, port: int, *flags: str) -> list[str]:
    model = str(settings.models[geometry])
    return [sys.executable, "-m", "rerankd", "serve", "--model", model, "--port", str(port), *flags]


def bench_rerankd(
    settings: BenchSettings, geometry: str, config: DebertaConfig, workloads: list[Workload], big: Workload
) -> tuple[list[Measurement], Fairness]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = _serve_command(
        settings, geometry, port, "--max-documents", str(max(settings.big_request, settings.passages))
    )
    log = settings.log_dir / f"rerankd-{geometry}.log"
    with running_process(command, url, log, env={"HF_HUB_OFFLINE": "1"}, ready_path="/ready") as server:
        dtype = httpx.get(f"{url}/info").json()["models"][0]["dtype"]
        _warm_up(f"{url}/rerank", workloads[0], None)
        measurements = [
            _http_measure(
                settings, "rerankd", dtype, f"{url}/rerank", workload, 1, None, _flops(config, workload)
            )
            for workload in workloads
        ]
        measurements.append(
            _http_measure(
                settings,
                "rerankd",
                dtype,
                f"{url}/rerank",
                workloads[0],
                settings.clients,
                None,
                _flops(config, workloads[0]),
            )
        )
        small = Workload(
            "small",
            workloads[0].query,
            workloads[0].documents[: settings.small_request],
            workloads[0].pair_lengths[: settings.small_request],
        )
        fairness = _fairness(f"{url}/rerank", small, big, settings)
        peak = server.peak_rss()
    for measurement in measurements:
        measurement.peak_rss = peak
    return measurements, fairness


def rerankd_bf16_peak_rss(settings: BenchSettings, geometry: str, workload: Workload) -> int | None:
    """Peak RSS of `rerankd serve --dtype bfloat16` after loading and scoring 8 of the workload's texts."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = _serve_command(settings, geometry, port, "--dtype", "bfloat16")
    log = settings.log_dir / f"rerankd-{geometry}-bf16.log"
    with running_process(command, url, log, env={"HF_HUB_OFFLINE": "1"}, ready_path="/ready") as server:
        _warm_up(f"{url}/rerank", workload, None)
        return server.peak_rss()


def bench_infinity(
    settings: BenchSettings, geometry: str, config: DebertaConfig, workloads: list[Workload]
) -> list[Measurement]:
    assert settings.infinity is not None
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        str(settings.infinity),
        "v2",
        "--model-id",
        str(settings.models[geometry]),
        "--served-model-name",
        "bench",
        "--engine",
        "torch",
        "--device",
        "cpu",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-bettertransformer",
        "--no-model-warmup",
    ]
    log = settings.log_dir / f"infinity-{geometry}.log"
    with running_process(command, url, log, env={"DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"}) as server:
        _warm_up(f"{url}/rerank", workloads[0], "bench")
        measurements = [
            _http_measure(
                settings,
                "infinity",
                "float32",
                f"{url}/rerank",
                workload,
                1,
                "bench",
                _flops(config, workload),
            )
            for workload in workloads
        ]
        measurements.append(
            _http_measure(
                settings,
                "infinity",
                "float32",
                f"{url}/rerank",
                workloads[0],
                settings.clients,
                "bench",
                _flops(config, workloads[0]),
            )
        )
        peak = server.peak_rss()
    for measurement in measurements:
        measurement.peak_rss = peak
    return measurements


def bench_crossencoder(
    settings: BenchSettings, geometry: str, config: DebertaConfig, workloads: list[Workload], dtype: str
) -> list[Measurement]:
    spec = {
        "model": str(settings.models[geometry]),
        "dtype": dtype,
        "max_requests": settings.max_requests,
        "max_seconds": settings.max_seconds,
        "workloads": [{"name": w.name, "query": w.query, "documents": w.documents} for w in workloads],
    }
    with tempfile.NamedTemporaryFile("w", suffix=".json") as spec_file:
        json.dump(spec, spec_file)
        spec_file.flush()
        log = settings.log_dir / f"crossencoder-{geometry}-{dtype}.log"
        with log.open("w") as log_file:
            completed = subprocess.run(
                [sys.executable, "-m", "rerankd.bench.crossencoder_worker", spec_file.name],
                stdout=subprocess.PIPE,
                stderr=log_file,
                text=True,
                check=False,
            )
    if completed.returncode != 0:
        raise RuntimeError(f"CrossEncoder worker failed ({completed.returncode}); see {log}")
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    measurements = []
    for workload, run in zip(workloads, report["runs"], strict=True):
        measurements.append(
            Measurement(
                f"sentence-transformers {dtype}",
                dtype,
                workload.name,
                1,
                run["latencies"],
                len(run["latencies"]) * len(workload.documents),
                run["seconds"],
                report["peak_rss"],
                _flops(config, workload),
            )
        )
        logger.info(
            "CrossEncoder %s %s: %.2f pairs/s", dtype, workload.name, measurements[-1].pairs_per_second
        )
    return measurements


def run_bench(settings: BenchSettings, command: str) -> BenchResult:
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    ceilings = {"float32": matmul_gflops(torch.float32), "bfloat16": matmul_gflops(torch.bfloat16)}
    logger.info("matmul ceilings (GFLOP/s): %s", {k: round(v) for k, v in ceilings.items()})
    dataset = load_beir(settings.data)
    results = []
    for geometry, model_dir in settings.models.items():
        config = DebertaConfig.from_dict(json.loads((model_dir / "config.json").read_text()))
        workloads = make_workloads(settings.data, model_dir, settings.passages, settings.long_documents)
        big = passages_workload(dataset, PairTokenizer(load_tokenizer(model_dir), 512), settings.big_request)
        result = GeometryResult(
            geometry,
            {
                "hidden": config.hidden_size,
                "layers": config.num_hidden_layers,
                "heads": config.num_attention_heads,
            },
            [
                {"name": w.name, "mean_tokens": w.mean_tokens, "gflops_per_pair": _flops(config, w) / 1e9}
                for w in workloads
            ],
        )
        if "rerankd" in settings.contenders:
            measured, result.fairness = bench_rerankd(settings, geometry, config, workloads, big)
            result.measurements += measured
            result.bf16_peak_rss = rerankd_bf16_peak_rss(settings, geometry, workloads[0])
        for contender, dtype in CROSSENCODER_DTYPES.items():
            if contender in settings.contenders:
                result.measurements += bench_crossencoder(settings, geometry, config, workloads, dtype)
        if "infinity" in settings.contenders and settings.infinity is not None:
            result.measurements += bench_infinity(settings, geometry, config, workloads)
        results.append(result)
    return BenchResult(
        datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        command,
        describe_machine(),
        ceilings,
        results,
    )
