"""`rerankd bench`: rerankd and its peers on the same model and workloads, in one run, on one machine.

Contenders: rerankd over HTTP (1 client and N concurrent clients), sentence-transformers `CrossEncoder.rank`
in fp32 and bf16 in a process of its own, and Infinity (`infinity-emb`) over HTTP, on DeBERTa models; and
rerankd serving a BERT GGUF through its llama.cpp backend against sentence-transformers on the same weights.
Every one gets a random-weight model at a real geometry with a real tokenizer, a warm-up (one short call on a
CPU, each workload once on a GPU), then timed calls; the scores of rerankd and sentence-transformers on the
same model are compared too.
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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch

from rerankd.bench.flops import EncoderShape, pair_flops
from rerankd.bench.machine import describe_machine, matmul_gflops
from rerankd.bench.measure import Measurement, http_load, mean, percentile, rerank_sender, timed_requests
from rerankd.bench.processes import free_port, running_process
from rerankd.bench.workloads import Workload, make_workloads, passages_workload
from rerankd.engine.scheduler import DEFAULT_BATCH_TOKENS
from rerankd.engine.tokenize import PairTokenizer
from rerankd.formats.tokenizer import load_tokenizer
from rerankd.modeling.config import DebertaConfig
from rerankd.quality.beir import load_beir

logger = logging.getLogger(__name__)

CROSSENCODER_DTYPES = {"st-fp32": "float32", "st-bf16": "bfloat16", "st-fp16": "float16"}
DEBERTA_CONTENDERS = ("rerankd", *CROSSENCODER_DTYPES, "infinity")
CONTENDERS = (*DEBERTA_CONTENDERS, "llamacpp")
# Each device's peers in the half precision they run fastest in there (bf16 on a CPU with bf16 units, fp16 on
# a GPU); no llama.cpp on a GPU by default (its pip build is CPU-only).
DEFAULT_CONTENDERS = {
    "cpu": ("rerankd", "st-fp32", "st-bf16", "infinity", "llamacpp"),
    "cuda": ("rerankd", "st-fp32", "st-fp16", "infinity"),
}
CEILING_DTYPES = {
    "cpu": (torch.float32, torch.bfloat16),
    "cuda": (torch.float32, torch.bfloat16, torch.float16),
}
# What Infinity computes in: its default (`auto`) on each device, named so its share of a ceiling is found.
INFINITY_DTYPES = {"cpu": "float32", "cuda": "float16"}
LLAMACPP_CONTENDER = "rerankd (llama.cpp)"
# What llama.cpp's weight types compute in, to find the matmul ceiling they are measured against.
GGUF_COMPUTE_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


@dataclass(frozen=True)
class BenchModel:
    """A model every contender of one section runs: its transformers folder (tokenizer for the workloads;
    what sentence-transformers and Infinity load) and what `rerankd serve --model` gets."""

    title: str
    folder: Path
    shape: dict[str, int]
    flops: Callable[[int], int]  # per pair of this many tokens
    served: Path
    serve_flags: tuple[str, ...] = ()

    @classmethod
    def deberta(cls, geometry: str, folder: Path) -> BenchModel:
        config = DebertaConfig.from_dict(json.loads((folder / "config.json").read_text()))
        return cls(
            geometry,
            folder,
            {
                "hidden": config.hidden_size,
                "layers": config.num_hidden_layers,
                "heads": config.num_attention_heads,
            },
            lambda length: pair_flops(config, length).total,
            folder,
        )

    @classmethod
    def llamacpp(cls, title: str, folder: Path, gguf_path: Path) -> BenchModel:
        config = json.loads((folder / "config.json").read_text())
        shape = EncoderShape.of_bert(config)
        return cls(
            title,
            folder,
            {"hidden": shape.hidden, "layers": shape.layers, "heads": int(config["num_attention_heads"])},
            lambda length: shape.pair_flops(length).total,
            gguf_path,
            ("--backend", "llamacpp"),
        )


# Timed requests per measurement unless asked. A CPU takes seconds over a 64-passage request, so three
# suffice; a GPU answers one in tens of milliseconds, where three would time mostly noise.
DEFAULT_MAX_REQUESTS = {"cpu": 3, "cuda": 100}


@dataclass(frozen=True)
class BenchSettings:
    data: Path
    models: dict[str, Path]  # geometry -> random-weight model folder
    contenders: tuple[str, ...] = CONTENDERS
    infinity: Path | None = None  # the `infinity_emb` executable (its own virtual environment)
    llamacpp: tuple[Path, Path] | None = None  # a BERT reranker: (transformers folder, the same as GGUF)
    passages: int = 64
    long_documents: int = 16
    max_requests: int | None = None  # timed requests per measurement; None: DEFAULT_MAX_REQUESTS[device]
    max_seconds: float = 60.0
    clients: int = 8
    big_request: int = 1000
    small_request: int = 10
    small_requests: int = 10
    log_dir: Path = Path("bench-logs")
    device: str = "cpu"  # where every contender runs: cpu or cuda

    def requests_per_client(self, clients: int) -> int:
        """The measurement's timed requests split among its clients, at least one each."""
        return max(1, (self.max_requests or DEFAULT_MAX_REQUESTS[self.device]) // clients)

    def warm_ups(self, workloads: list[Workload]) -> list[Workload]:
        """What every contender scores untimed before it is timed. A GPU pays the first time it meets a batch
        shape (cuBLAS picks kernels, a CUDA graph is captured), so there each workload whole; on a CPU a
        short call does."""
        return workloads if self.device == "cuda" else [_short_warm_up(workloads[0])]


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
    # Max |Δscore| of each sentence-transformers dtype against rerankd on the first workload's documents.
    score_drift: dict[str, float] = field(default_factory=dict)

    def measurement(self, contender: str, workload: str, clients: int = 1) -> Measurement | None:
        """The run of `contender` on `workload` with `clients` clients, if it was measured."""
        for measurement in self.measurements:
            if (measurement.contender, measurement.workload, measurement.clients) == (
                contender,
                workload,
                clients,
            ):
                return measurement
        return None

    def concurrent(self, contender: str, workload: str) -> Measurement | None:
        """The run of `contender` on `workload` with several clients at once, if it was measured."""
        return next(
            (
                m
                for m in self.measurements
                if (m.contender, m.workload) == (contender, workload) and m.clients > 1
            ),
            None,
        )


@dataclass
class BenchResult:
    date: str
    command: str
    machine: dict[str, object]
    ceilings: dict[str, float]  # dtype -> matmul GFLOP/s
    ceiling_shape: tuple[int, int, int]  # the product measured: (rows, inner, columns)
    geometries: list[GeometryResult]
    device: str = "cpu"  # where every contender ran: cpu | cuda


def _flops(model: BenchModel, workload: Workload) -> float:
    return mean([float(model.flops(length)) for length in workload.pair_lengths])


def _body(workload: Workload, model: str | None = None) -> dict[str, object]:
    body: dict[str, object] = {"query": workload.query, "documents": workload.documents}
    if model is not None:
        body["model"] = model
    return body


def _short_warm_up(workload: Workload) -> Workload:
    return Workload("warm-up", workload.query, workload.documents[:8], workload.pair_lengths[:8])


def _warm_up(url: str, workloads: list[Workload], model: str | None) -> None:
    for workload in workloads:
        httpx.post(url, json=_body(workload, model), timeout=600).raise_for_status()


def _served_scores(url: str, workload: Workload) -> list[float]:
    """The server's relevance scores for the workload's documents, in input order."""
    response = httpx.post(url, json=_body(workload), timeout=3600)
    response.raise_for_status()
    scores = [0.0] * len(workload.documents)
    for result in response.json()["results"]:
        scores[result["index"]] = result["relevance_score"]
    return scores


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
    requests = settings.requests_per_client(clients)
    load = http_load(url, _body(workload, model), clients, requests, settings.max_seconds)
    pairs = len(load.latencies) * len(workload.documents)
    logger.info("%s %s, %d client(s): %.2f pairs/s", contender, workload.name, clients, pairs / load.seconds)
    return Measurement(
        contender,
        dtype,
        workload.name,
        clients,
        load.latencies,
        pairs,
        load.seconds,
        mean_flops=flops,
        server_ms=load.server_ms,
    )


def _measure_server(
    settings: BenchSettings,
    contender: str,
    dtype: str,
    url: str,
    model: BenchModel,
    workloads: list[Workload],
    served_name: str | None = None,
) -> list[Measurement]:
    """Warm up, then every workload from one client and the first from `settings.clients` at once."""
    _warm_up(url, settings.warm_ups(workloads), served_name)
    runs = [(workload, 1) for workload in workloads] + [(workloads[0], settings.clients)]
    return [
        _http_measure(
            settings, contender, dtype, url, workload, clients, served_name, _flops(model, workload)
        )
        for workload, clients in runs
    ]


def _queued_pairs(client: httpx.Client, base_url: str) -> float:
    """The server's queue, from its Prometheus metrics."""
    lines = client.get(f"{base_url}/metrics").text.splitlines()
    return sum(float(line.split()[-1]) for line in lines if line.startswith("rerankd_queued_pairs{"))


def _fairness(base_url: str, small: Workload, big: Workload, settings: BenchSettings) -> Fairness:
    """p95 of small requests alone, then while one big request is queued and running."""
    rerank_url = f"{base_url}/rerank"
    with httpx.Client(timeout=3600) as client:
        send_small = rerank_sender(client, rerank_url, _body(small))
        alone = timed_requests(send_small, settings.small_requests, settings.max_seconds)
        big_done = threading.Event()
        big_seconds = [0.0]

        def send_big() -> None:
            with httpx.Client(timeout=3600) as big_client:
                started = time.perf_counter()
                rerank_sender(big_client, rerank_url, _body(big))()
                big_seconds[0] = time.perf_counter() - started
                big_done.set()

        thread = threading.Thread(target=send_big)
        thread.start()
        # The small requests go once the big one's pairs are queued (a GPU may finish it within a second).
        deadline = time.perf_counter() + 60
        while not big_done.is_set() and time.perf_counter() < deadline:
            if _queued_pairs(client, base_url) > 0:
                break
            time.sleep(0.002)
        during: list[float] = []
        while not big_done.is_set() and len(during) < 10 * settings.small_requests:
            during += timed_requests(send_small, 1, settings.max_seconds)
        thread.join()
    if not during:
        raise RuntimeError(f"the {len(big.documents)}-document request was done before a small one could run")
    return Fairness(percentile(alone, 95), percentile(during, 95), len(during), big_seconds[0])


def _log(settings: BenchSettings, contender: str, model: BenchModel) -> Path:
    return settings.log_dir / f"{contender}-{model.served.stem}.log"


def _serve_command(settings: BenchSettings, model: BenchModel, port: int, *flags: str) -> list[str]:
    command = [sys.executable, "-m", "rerankd", "serve", "--model", str(model.served), "--port", str(port)]
    return [*command, "--device", settings.device, *model.serve_flags, *flags]


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
) -> ServedRun:
    """rerankd over HTTP; with `big`, also the fairness of small requests next to it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = _serve_command(
        settings, model, port, "--max-documents", str(max(settings.big_request, settings.passages))
    )
    log = _log(settings, "rerankd", model)
    with running_process(command, url, log, env={"HF_HUB_OFFLINE": "1"}, ready_path="/ready") as server:
        info = httpx.get(f"{url}/info").json()["models"][0]
        dtype = GGUF_COMPUTE_DTYPES.get(info["dtype"], info["dtype"])
        run = ServedRun(
            _measure_server(settings, contender, dtype, f"{url}/rerank", model, workloads),
            _served_scores(f"{url}/rerank", workloads[0]),
        )
        if big is not None:
            small = Workload(
                "small",
                workloads[0].query,
                workloads[0].documents[: settings.small_request],
                workloads[0].pair_lengths[: settings.small_request],
            )
            run.fairness = _fairness(url, small, big, settings)
        peak = server.peak_rss()
    for measurement in run.measurements:
        measurement.peak_rss = peak
    return run


def rerankd_bf16_peak_rss(settings: BenchSettings, model: BenchModel, workload: Workload) -> int | None:
    """Peak RSS of `rerankd serve --dtype bfloat16` after loading and scoring 8 of the workload's texts."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = _serve_command(settings, model, port, "--dtype", "bfloat16")
    log = _log(settings, "rerankd-bf16", model)
    with running_process(command, url, log, env={"HF_HUB_OFFLINE": "1"}, ready_path="/ready") as server:
        _warm_up(f"{url}/rerank", [_short_warm_up(workload)], None)
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


def bench_crossencoder(
    settings: BenchSettings, model: BenchModel, workloads: list[Workload], dtype: str
) -> tuple[list[Measurement], list[float]]:
    """sentence-transformers in a process of its own; also its scores for the first workload."""
    spec = {
        "model": str(model.folder),
        "dtype": dtype,
        "device": settings.device,
        "max_requests": settings.requests_per_client(1),
        "max_seconds": settings.max_seconds,
        "warm_ups": [{"query": w.query, "documents": w.documents} for w in settings.warm_ups(workloads)],
        "workloads": [{"name": w.name, "query": w.query, "documents": w.documents} for w in workloads],
    }
    with tempfile.NamedTemporaryFile("w", suffix=".json") as spec_file:
        json.dump(spec, spec_file)
        spec_file.flush()
        log = _log(settings, f"crossencoder-{dtype}", model)
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
                _flops(model, workload),
            )
        )
        logger.info(
            "CrossEncoder %s %s: %.2f pairs/s", dtype, workload.name, measurements[-1].pairs_per_second
        )
    return measurements, report["scores"]


def _max_difference(left: list[float], right: list[float]) -> float:
    return max(abs(a - b) for a, b in zip(left, right, strict=True))


def bench_model(
    settings: BenchSettings,
    model: BenchModel,
    contender: str | None,
    crossencoders: dict[str, str],
    peers: bool,
) -> GeometryResult:
    """One section: rerankd as `contender` (None: not measured), sentence-transformers in `crossencoders`'
    dtypes and, with `peers`, the fairness run, the bf16 footprint and Infinity."""
    workloads = make_workloads(settings.data, model.folder, settings.passages, settings.long_documents)
    result = GeometryResult(
        model.title,
        model.shape,
        [
            {"name": w.name, "mean_tokens": w.mean_tokens, "gflops_per_pair": _flops(model, w) / 1e9}
            for w in workloads
        ],
    )
    served_scores = None
    if contender is not None:
        big = None
        if peers:
            tokenizer = PairTokenizer(load_tokenizer(model.folder), 512)
            big = passages_workload(load_beir(settings.data), tokenizer, settings.big_request)
        run = bench_rerankd(settings, model, contender, workloads, big)
        result.measurements += run.measurements
        result.fairness, served_scores = run.fairness, run.scores
        if peers:
            result.bf16_peak_rss = rerankd_bf16_peak_rss(settings, model, workloads[0])
    for dtype in crossencoders.values():
        measured, scores = bench_crossencoder(settings, model, workloads, dtype)
        result.measurements += measured
        if served_scores is not None:
            result.score_drift[dtype] = _max_difference(served_scores, scores)
    if peers and "infinity" in settings.contenders and settings.infinity is not None:
        result.measurements += bench_infinity(settings, model, workloads)
    return result


def ceiling_shape(device: str) -> tuple[int, int, int]:
    """base's 768→3072 feed-forward over the scheduler's default token budget on `device`: the product the
    dense layers run against."""
    return (DEFAULT_BATCH_TOKENS[device], 768, 3072)


def measure_ceilings(device: str) -> dict[str, float]:
    shape = ceiling_shape(device)
    ceilings = {
        str(dtype).removeprefix("torch."): matmul_gflops(dtype, shape, device=device)
        for dtype in CEILING_DTYPES[device]
    }
    logger.info("matmul ceilings (GFLOP/s): %s", {k: round(v) for k, v in ceilings.items()})
    return ceilings


def run_bench(settings: BenchSettings, command: str) -> BenchResult:
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    ceilings = measure_ceilings(settings.device)
    crossencoders = {
        name: dtype for name, dtype in CROSSENCODER_DTYPES.items() if name in settings.contenders
    }
    results = [
        bench_model(
            settings,
            BenchModel.deberta(geometry, folder),
            "rerankd" if "rerankd" in settings.contenders else None,
            crossencoders,
            peers=True,
        )
        for geometry, folder in settings.models.items()
        if set(settings.contenders) & set(DEBERTA_CONTENDERS)
    ]
    if "llamacpp" in settings.contenders and settings.llamacpp is not None:
        folder, gguf_path = settings.llamacpp
        model = BenchModel.llamacpp("BERT MiniLM-L6 geometry, F32 GGUF on llama.cpp", folder, gguf_path)
        results.append(bench_model(settings, model, LLAMACPP_CONTENDER, {"st-fp32": "float32"}, peers=False))
    # A busy neighbour can depress one measurement; the ceiling is the best the machine showed in the run.
    ceilings = {
        dtype: max(gflops, ceilings[dtype]) for dtype, gflops in measure_ceilings(settings.device).items()
    }
    return BenchResult(
        datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        command,
        describe_machine(),
        ceilings,
        ceiling_shape(settings.device),
        results,
        settings.device,
    )
