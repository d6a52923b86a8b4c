"""Serving GGUF files: backend choice, variant selection (local and from the Hub), fidelity of each export
type against the safetensors model at the base geometry, errors, and memory while loading."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from gguf import GGUFWriter

from rerankd.backends.base import ModelLoadError
from rerankd.backends.registry import FileVariant
from rerankd.devtools.random_model import write_random_model
from rerankd.engine.loader import load_engine, split_selector
from rerankd.fidelity import builtin_cases
from rerankd.formats.gguf_writer import export_gguf
from rerankd.quality.scorers import EngineScorer
from rerankd.quality.validate import beir_case, render_table, validate
from rerankd.settings import RuntimeSettings

from conftest import SHARED_TOKENIZER, load_backend_at
from fakehub import FakeHub, point_huggingface_hub_at
from memory import HAS_PROC_STATUS, load_memory
from serving import running_server

EXPORTS = {"F32": "f32", "F16": "f16", "Q8_0": "q8_0", "Q4_K": "q4_k"}


@pytest.fixture(scope="module")
def xsmall_variants(xsmall_model_dir: Path, module_folder: Callable[[str], Path]) -> Path:
    """A folder as Antfly publishes one: several `<model>.<TYPE>.gguf` files and sidecars."""
    folder = module_folder("variants")
    for variant in ("F32", "Q8_0"):
        export_gguf(xsmall_model_dir, folder / f"mxbai-rerank-xsmall-v1.{variant}.gguf", EXPORTS[variant])
    (folder / "model_manifest.json").write_text('{"type":"reranker","tasks":["rerank"],"inputs":["text"]}')
    return folder


def test_selector_syntax() -> None:
    assert split_selector("antflydb/mxbai-rerank-base-v1:gguf:Q8_0") == (
        "antflydb/mxbai-rerank-base-v1",
        FileVariant("gguf", "Q8_0"),
    )
    assert split_selector("./models/x:gguf:q4_k") == ("./models/x", FileVariant("gguf", "Q4_K"))
    assert split_selector("mixedbread-ai/mxbai-rerank-base-v1") == (
        "mixedbread-ai/mxbai-rerank-base-v1",
        None,
    )


@pytest.mark.slow
def test_backend_is_chosen_from_the_files(xsmall_model_dir: Path, xsmall_variants: Path) -> None:
    assert load_backend_at(xsmall_model_dir).info.backend == "torch"
    assert load_backend_at(xsmall_variants / "mxbai-rerank-xsmall-v1.Q8_0.gguf").info.backend == "gguf"
    assert load_backend_at(xsmall_variants).info.backend == "gguf"
    with pytest.raises(ModelLoadError, match=r"no Q4_K GGUF file \(found: F32, Q8_0\)"):
        load_backend_at(xsmall_variants, FileVariant("gguf", "Q4_K"))


@pytest.mark.slow
def test_folder_serves_its_most_faithful_variant_unless_one_is_selected(
    xsmall_model_dir: Path, xsmall_variants: Path
) -> None:
    def scores(model: str) -> list[float]:
        scorer = EngineScorer(model, load_engine(model))
        try:
            return scorer.scores("who wrote it?", ["Harper Lee wrote it.", "Melville did not.", ""])
        finally:
            scorer.close()

    reference = scores(str(xsmall_model_dir))
    assert scores(str(xsmall_variants)) == pytest.approx(reference, abs=1e-5)  # F32 preferred
    quantized = scores(f"{xsmall_variants}:gguf:Q8_0")
    assert quantized != pytest.approx(reference, abs=1e-7)
    assert quantized == pytest.approx(reference, abs=1e-2)


@pytest.mark.slow
@pytest.mark.network
def test_hub_variant_selector_downloads_only_that_variant(
    xsmall_variants: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = {path.name: path.read_bytes() for path in xsmall_variants.iterdir()}
    files["README.md"] = b"# card"
    with FakeHub() as hub:
        point_huggingface_hub_at(monkeypatch, hub.url)
        hub.add_repo("antflydb/mxbai-rerank-xsmall-v1").commit(files)
        engine = load_engine(
            "antflydb/mxbai-rerank-xsmall-v1:gguf:Q8_0", RuntimeSettings(model_cache=tmp_path)
        )
        engine.close()
        fetched = set(hub.fetched_files("antflydb/mxbai-rerank-xsmall-v1"))
    assert fetched == {"mxbai-rerank-xsmall-v1.Q8_0.gguf", "model_manifest.json"}
    assert engine.info.backend == "gguf"


def test_other_architectures_get_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "bge.Q8_0.gguf"
    writer = GGUFWriter(path, "bert")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match=r"bge\.Q8_0\.gguf.*'bert'.*llama\.cpp"):
        load_backend_at(path)


@pytest.fixture(scope="module")
def spread_base_model(module_folder: Callable[[str], Path]) -> Path:
    """Base geometry with a wider init, so documents' scores are far enough apart to have an order."""
    tokenizer = SHARED_TOKENIZER if SHARED_TOKENIZER.exists() else None
    return write_random_model(module_folder("spread-base"), "base", tokenizer_dir=tokenizer, init_std=0.05)


@pytest.fixture(scope="module")
def spread_base_q8_0(spread_base_model: Path, module_folder: Callable[[str], Path]) -> Path:
    """`spread_base_model` exported to Q8_0, once for every test that loads it."""
    path = module_folder("spread-base-q8_0") / "base.Q8_0.gguf"
    export_gguf(spread_base_model, path, "q8_0")
    return path


@pytest.mark.slow
def test_base_geometry_round_trip_of_every_export_type(
    spread_base_model: Path, tmp_path: Path, msmarco_dir: Path
) -> None:
    """F32 equals the safetensors model within 1e-5, F16 within 1e-3; Q8_0 keeps the top-1 document of every
    model card validation case; Q8_0 drifts less than Q4_K. The table is printed (`pytest -s`).

    Not asserted, because random weights cannot show it: Q4_K's top-1 and the MS MARCO run's top-1. Random
    weights put the scores of different documents closer together than a trained model does, within Q4_K's
    noise (its drift here, 0.1-0.3, is the size the model card reports for the real Q4_K file, 0.126).
    """
    for variant, qtype in EXPORTS.items():
        export_gguf(spread_base_model, tmp_path / f"base.{variant}.gguf", qtype)

    def scorer(label: str, model: Path):
        return lambda: EngineScorer(label, load_engine(str(model)))

    cases = [*builtin_cases(), beir_case(msmarco_dir, max_queries=3, documents_per_query=8)]
    variants = [scorer(variant, tmp_path / f"base.{variant}.gguf") for variant in EXPORTS]
    results = validate(scorer("safetensors", spread_base_model), variants, cases)
    drift = {variant: max(r.max_abs_delta for r in results if r.variant == variant) for variant in EXPORTS}
    print("max |Δscore| against the safetensors model:", json.dumps(drift))
    assert drift["F32"] <= 1e-5
    assert drift["F16"] <= 1e-3
    card_cases = {case.name for case in builtin_cases()}
    print(render_table("safetensors", results))
    assert all(r.top1_preserved for r in results if r.case in card_cases and r.variant == "Q8_0")
    assert drift["Q4_K"] < 0.5
    assert drift["Q8_0"] < drift["Q4_K"]


@pytest.mark.slow
@pytest.mark.skipif(not HAS_PROC_STATUS, reason="reads RSS from /proc")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_peak_memory_while_loading_stays_under_one_and_a_half_times_loaded(
    spread_base_q8_0: Path, dtype: str
) -> None:
    memory = load_memory(spread_base_q8_0, dtype)
    # The bound is 1.5x; dropping each tensor's mapped pages once copied brought it from 1.32/1.45x
    # (fp32/bf16) to 1.10/1.15x, and 1.25x keeps that from regressing unnoticed.
    assert memory.peak < 1.25 * memory.loaded, f"peak {memory.peak:.0f} MB vs loaded {memory.loaded:.0f} MB"


@pytest.mark.slow
@pytest.mark.network
def test_served_over_http(xsmall_variants: Path, tmp_path: Path) -> None:
    model = str(xsmall_variants / "mxbai-rerank-xsmall-v1.Q8_0.gguf")
    with running_server(["--model", model, "--served-model-name", "xs-q8"], tmp_path / "log") as url:
        response = httpx.post(f"{url}/rerank", json={"query": "q", "documents": ["a", "b c"]}, timeout=60)
    assert response.status_code == 200
    assert response.json()["model"] == "xs-q8"
