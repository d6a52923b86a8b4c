"""The CUDA path where a GPU is present: the same parity bounds as on a CPU, no wait for the GPU inside a
forward pass, and a server that picks float16 under `--dtype auto`. CI has no GPU, so these skip there; the
CUDA logic's CPU-runnable parts are tested beside the CPU path's (the attention, the token layout, the
scheduler queueing a batch behind a running one)."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from rerankd.backends.cuda_graphs import CapturedPasses, bucketed_shapes
from rerankd.backends.safetensors_backend import load_safetensors_backend
from rerankd.devtools.random_model import random_checkpoint
from rerankd.engine.precision import MAX_SCORE_DELTA
from rerankd.engine.tokenize import PairTokenizer
from rerankd.modeling.config import DebertaConfig
from rerankd.modeling.weights import load_reranker
from rerankd.settings import RuntimeSettings

from parity import BATCHES, DictReader, Truth, TruthErrors, geometry_config, padded_batch, reference_model
from serving import running_server

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]
CUDA = torch.device("cuda")


def on_cuda(config: dict, tensors: dict[str, torch.Tensor], dtype: torch.dtype):
    return load_reranker(DebertaConfig.from_dict(config), DictReader(tensors), dtype, CUDA)


def test_cuda_forward_equals_the_reference_in_float32() -> None:
    """As on a CPU: no further from the float64 reference than a float32 reference on the CPU is."""
    config = geometry_config("xsmall")
    tensors = random_checkpoint({**config, "initializer_range": 0.1}, seed=1, dtype=torch.float16)
    truth, ours = Truth(config, tensors, BATCHES["xsmall"]), on_cuda(config, tensors, torch.float32)
    for lengths, (input_ids, mask), reference, expected in zip(
        truth.batches, truth.inputs, truth.reference, truth.truth, strict=True
    ):
        with torch.inference_mode():
            actual = ours(input_ids.to(CUDA), mask.to(CUDA)).cpu()
        errors = TruthErrors.of(actual, reference, expected)
        assert errors.holds, f"{lengths}: {errors}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_precision_holds_the_auto_bound(dtype: torch.dtype) -> None:
    config = geometry_config("base")
    tensors = random_checkpoint(config, seed=1, dtype=torch.float16)
    reference, ours = reference_model(config, tensors, torch.float64), on_cuda(config, tensors, dtype)
    input_ids, mask = padded_batch([5, 60, 130, 300, 512], config["vocab_size"], seed=7)
    with torch.inference_mode():
        expected = reference(input_ids=input_ids, attention_mask=mask).logits.sigmoid()
        actual = ours(input_ids.to(CUDA), mask.to(CUDA)).double().sigmoid().cpu()
    assert (actual - expected).abs().max().item() <= MAX_SCORE_DELTA


def test_a_batch_is_queued_without_waiting_for_the_gpu(xsmall_model_dir: Path) -> None:
    """The backend pads, lays out and queues a whole pass and its logits' copy back without one synchronizing
    call (torch raises on any while the sync debug mode is "error"), so the scheduler can queue the next
    batch while this one runs; `result` then waits for the logits."""
    settings = RuntimeSettings(dtype="float16", cuda_graphs=False).for_device("cuda")
    backend = load_safetensors_backend(xsmall_model_dir, settings)
    documents = ["Paris.", "Bananas are yellow. " * 20, "word " * 600]
    batch = PairTokenizer(backend.tokenizer, 512).encode_pairs("What is the capital of France?", documents)
    expected = backend.relevance_logits(batch)  # also fills the page-locked buffer cache
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        pending = [backend.launch(batch), backend.launch(batch)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert not any(logits.ready for logits in pending)
    for logits in pending:
        assert logits.result() == pytest.approx(expected, abs=1e-6)


def test_cuda_graphs_score_as_the_eager_pass(xsmall_model_dir: Path) -> None:
    """Batches of several shapes, some in one bucket: replayed graphs give the eager pass's logits, one graph
    per bucket, and once a bucket is captured its batches are queued without a synchronizing call."""
    settings = RuntimeSettings(dtype="float32", max_batch_tokens=2048, max_batch_pairs=16).for_device("cuda")
    eager = load_safetensors_backend(xsmall_model_dir, settings.model_copy(update={"cuda_graphs": False}))
    graphed = load_safetensors_backend(xsmall_model_dir, settings)
    graphed.prepare_for_serving()
    captured = bucketed_shapes(2048, 16, 512)
    assert sorted(graphed._graphs.shapes) == sorted(captured)
    seconds = graphed.pass_seconds()
    assert 0 < seconds(1, 10) < seconds(16, 128)
    tokenizer = PairTokenizer(eager.tokenizer, 512)
    query = "What is the capital of France?"
    batches = [
        tokenizer.encode_pairs(query, ["Paris.", "Bananas are yellow. " * 20, "word " * 600]),
        tokenizer.encode_pairs(query, ["Lyon.", "Apples are red. " * 21, "term " * 600]),
        tokenizer.encode_pairs(query, [f"Document {index} about cities." for index in range(11)]),
        tokenizer.encode_pairs(query, ["Rome."]),
    ]
    for batch in batches:
        assert graphed.relevance_logits(batch) == pytest.approx(eager.relevance_logits(batch), abs=1e-4)
    assert sorted(graphed._graphs.shapes) == sorted(captured)  # no batch waited for a capture
    expected = graphed.relevance_logits(batches[1])  # refills the page-locked buffers a capture freed
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        pending = graphed.launch(batches[1])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert pending.result() == expected


def test_captured_shapes_share_their_work_memory(xsmall_model_dir: Path) -> None:
    """Capturing all 319 shapes of the default CUDA limits reserves at most twice the GPU memory that the
    biggest one alone does (before their first runs shared one stream, all of base's shapes held 8.6 GiB)."""
    backend = load_safetensors_backend(xsmall_model_dir, RuntimeSettings(dtype="float16").for_device("cuda"))
    shapes = bucketed_shapes(16384, 64, backend.info.max_length)
    passes = CapturedPasses(backend.model, CUDA, backend.info.max_length)
    # Each capture empties torch's cache of freed blocks: start from an empty one, not from earlier tests'.
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_reserved()
    passes.capture_all(shapes[:1])
    biggest = torch.cuda.memory_reserved() - before
    passes.capture_all(shapes)
    assert len(passes.shapes) == len(shapes) == 319
    assert torch.cuda.memory_reserved() - before <= 2 * biggest


def test_server_on_cuda_serves_float16_under_auto(xsmall_model_dir: Path, tmp_path: Path) -> None:
    """Two pairs per batch, so a request's batches and concurrent requests' batches are queued behind running
    ones: every concurrent answer equals the lone one, kernel by kernel and as CUDA graphs, the default."""
    documents = ["Paris is the capital of France.", "Bananas are yellow.", "France's capital city is Paris."]
    body = {"query": "What is the capital of France?", "documents": documents}
    scores = {}
    for dtype, graphs in (("float32", False), ("auto", False), ("auto", True)):
        args = [
            "--model",
            str(xsmall_model_dir),
            "--device",
            "cuda",
            "--dtype",
            dtype,
            "--max-batch-pairs",
            "2",
            *([] if graphs else ["--no-cuda-graphs"]),
        ]
        run = f"{dtype}{'-graphs' if graphs else ''}"
        with running_server(args, tmp_path / f"{run}.log", env={"RERANKD_DTYPE": dtype}) as url:
            info = httpx.get(f"{url}/info").json()["models"][0]
            assert (info["device"], info["dtype"]) == ("cuda", "float32" if dtype == "float32" else "float16")
            results = httpx.post(f"{url}/rerank", json=body, timeout=60).json()["results"]
            scores[run] = {result["index"]: result["relevance_score"] for result in results}
            with ThreadPoolExecutor(max_workers=6) as pool:
                concurrent = pool.map(lambda _: httpx.post(f"{url}/rerank", json=body, timeout=60), range(6))
                for response in concurrent:
                    again = {
                        result["index"]: result["relevance_score"] for result in response.json()["results"]
                    }
                    assert again == pytest.approx(scores[run], abs=1e-6)
        assert ("as a CUDA graph" in (tmp_path / f"{run}.log").read_text()) == graphs
    for half in ("auto", "auto-graphs"):
        drift = max(abs(scores[half][index] - scores["float32"][index]) for index in range(3))
        assert drift <= MAX_SCORE_DELTA


def test_bench_on_cuda(
    xsmall_model_dir: Path, msmarco_dir: Path, shared_tokenizer_dir: Path, tmp_path: Path
) -> None:
    """`rerankd bench --device cuda`: rerankd serving on the GPU next to sentence-transformers in fp32 and
    fp16 there, against the GPU's matmul ceilings at its token budget."""
    models = tmp_path / "models"
    models.mkdir()
    (models / "random-xsmall").symlink_to(xsmall_model_dir)
    raw = tmp_path / "bench.json"
    command = [
        sys.executable, "-m", "rerankd", "bench", "--device", "cuda", "--geometry", "xsmall",
        "--family", "none", "--data", str(msmarco_dir), "--tokenizer", str(shared_tokenizer_dir),
        "--models-dir", str(models),
        "--contenders", "rerankd", "st-fp32", "st-fp16", "--passages", "6", "--long-documents", "1",
        "--max-requests", "2", "--clients", "2", "--big-request", "1000",
        "--out", str(tmp_path / "BENCHMARKS.md"), "--json", str(raw),
    ]  # fmt: skip
    completed = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={**os.environ, "RERANKD_DTYPE": "auto"},
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(raw.read_text())
    assert result["ceiling_shape"] == [16384, 768, 3072]
    assert set(result["ceilings"]) == {"float32", "bfloat16", "float16"}
    [geometry] = result["geometries"]
    seen = {(m["contender"], m["dtype"], m["clients"]) for m in geometry["measurements"]}
    assert ("rerankd", "float16", 1) in seen and ("sentence-transformers float16", "float16", 1) in seen
    assert geometry["score_drift"]["sentence-transformers float16"] <= MAX_SCORE_DELTA
