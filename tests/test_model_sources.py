"""Every way a model reaches the server: Hub download (fake Hub on loopback), sharded and fp16/bf16/fp32
safetensors, spm.model without tokenizer.json, and the device/dtype choices."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from rerankd.backends.base import ModelLoadError
from rerankd.devtools.random_model import write_random_model
from rerankd.engine.loader import load_engine
from rerankd.settings import RuntimeSettings

from fakehub import FakeHub
from serving import running_server

QUERY = "Who wrote To Kill a Mockingbird?"
DOCUMENTS = [
    "To Kill a Mockingbird is a novel by Harper Lee.",
    "Moby-Dick was written by Herman Melville.",
    "",
]
HUB_ID = "mixedbread-ai/mxbai-rerank-xsmall-v1"


def logits(model: Path, **settings) -> list[float]:
    engine = load_engine(str(model), RuntimeSettings(**settings))
    try:
        return asyncio.run(engine.score(QUERY, DOCUMENTS)).logits
    finally:
        engine.close()


@pytest.mark.slow
@pytest.mark.network
def test_hub_id_downloads_then_serves_from_the_verified_cache(xsmall_model_dir: Path, tmp_path: Path) -> None:
    files = {path.name: path.read_bytes() for path in xsmall_model_dir.iterdir()}
    cache = tmp_path / "cache"
    args = ["--model", HUB_ID, "--model-cache", str(cache)]
    body = {"query": QUERY, "documents": DOCUMENTS}
    with FakeHub() as hub:
        hub.add_repo(HUB_ID).commit(files)
        online = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1"}
        with running_server(args, tmp_path / "online.log", env=online) as url:
            downloaded = httpx.post(f"{url}/rerank", json=body, timeout=60).json()
            assert set(hub.fetched_files(HUB_ID)) == set(files)
    assert downloaded["model"] == HUB_ID
    assert list(cache.glob("rerankd-manifests/mixedbread-ai--mxbai-rerank-xsmall-v1/*.json"))

    # The Hub is gone: the next start serves the same commit from the cache, after verifying it.
    with running_server(args, tmp_path / "offline.log") as url:
        cached = httpx.post(f"{url}/rerank", json=body, timeout=60).json()
    assert cached["results"] == downloaded["results"]
    assert "Verified cached files" in (tmp_path / "offline.log").read_text()


def test_sharded_checkpoint_scores_like_the_single_file(xsmall_model_dir: Path, tmp_path: Path) -> None:
    sharded = tmp_path / "sharded"
    shutil.copytree(xsmall_model_dir, sharded)
    tensors = load_file(sharded / "model.safetensors")
    (sharded / "model.safetensors").unlink()
    names = sorted(tensors)
    weight_map = {}
    for shard, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :]), start=1):
        filename = f"model-{shard:05d}-of-00002.safetensors"
        save_file({name: tensors[name] for name in part}, str(sharded / filename))
        weight_map.update(dict.fromkeys(part, filename))
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    assert logits(sharded) == logits(xsmall_model_dir)


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float32])
def test_bf16_and_fp32_checkpoints_load(
    tmp_path: Path, shared_tokenizer_dir: Path, stored: torch.dtype
) -> None:
    """The same values stored as bf16 and as fp32 give the same float32 scores."""
    narrow = write_random_model(tmp_path / "bf16", "xsmall", shared_tokenizer_dir, dtype=torch.bfloat16)
    widened = tmp_path / "widened"
    shutil.copytree(narrow, widened)
    tensors = {name: tensor.to(stored) for name, tensor in load_file(narrow / "model.safetensors").items()}
    save_file(tensors, str(widened / "model.safetensors"))
    assert logits(widened) == pytest.approx(logits(narrow), abs=1e-6)


def test_spm_model_without_tokenizer_json(xsmall_model_dir: Path, tmp_path: Path) -> None:
    spm_only = tmp_path / "spm-only"
    shutil.copytree(xsmall_model_dir, spm_only)
    if not (spm_only / "spm.model").exists():
        pytest.skip("this model folder has no spm.model")
    (spm_only / "tokenizer.json").unlink()
    assert logits(spm_only) == logits(xsmall_model_dir)


def test_bfloat16_compute_dtype(xsmall_model_dir: Path) -> None:
    reduced = logits(xsmall_model_dir, dtype="bfloat16")
    full = logits(xsmall_model_dir)
    assert max(abs(a - b) for a, b in zip(reduced, full, strict=True)) < 0.05


def test_cuda_without_a_gpu_is_a_clear_error(xsmall_model_dir: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ModelLoadError, match="CUDA is not available"):
        load_engine(str(xsmall_model_dir), RuntimeSettings(device="cuda"))
