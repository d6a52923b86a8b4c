"""`rerankd validate`: the model card's table for variants of a model, in process and through a server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rerankd.engine.loader import load_engine
from rerankd.fidelity import ValidationCase, builtin_cases
from rerankd.quality.scorers import EngineScorer, HTTPScorer
from rerankd.quality.validate import beir_case, compare, render_table, validate
from rerankd.settings import RuntimeSettings

from serving import running_server

CASE_NAMES = ["basic relevance ranking", "empty document", "long-input truncation", "multi-document ordering"]


def engine_scorer(model: Path, dtype: str = "auto"):
    return lambda: EngineScorer(
        f"{model.name}:{dtype}", load_engine(str(model), RuntimeSettings(dtype=dtype))
    )


def test_compare_reports_top1_order_and_max_delta() -> None:
    case = ValidationCase("c", [("q", ["a", "b", "c"]), ("q2", ["d", "e"])])
    same_top = compare("v", case, [[0.9, 0.5, 0.4], [0.1, 0.2]], [[0.8, 0.3, 0.35], [0.15, 0.2]])
    assert (same_top.top1_preserved, same_top.order_preserved) == (True, False)
    assert same_top.max_abs_delta == pytest.approx(0.2)
    flipped = compare("v", case, [[0.9, 0.5, 0.4], [0.1, 0.2]], [[0.4, 0.5, 0.3], [0.1, 0.2]])
    assert not flipped.top1_preserved


@pytest.mark.slow
def test_bf16_variant_against_fp32_base_with_passages(xsmall_model_dir: Path, msmarco_dir: Path) -> None:
    cases = [*builtin_cases(), beir_case(msmarco_dir, max_queries=3, documents_per_query=8)]
    results = validate(
        engine_scorer(xsmall_model_dir, "float32"), [engine_scorer(xsmall_model_dir, "bfloat16")], cases
    )
    assert [result.case for result in results][:4] == CASE_NAMES
    assert results[4].case == "msmarco-dl19-subset passages (3 queries)"
    assert all(0.0 < result.max_abs_delta < 0.05 for result in results)
    table = render_table("fp32", results)
    assert all(name in table for name in CASE_NAMES)


@pytest.mark.slow
@pytest.mark.network
def test_through_a_running_server_equals_in_process(xsmall_model_dir: Path, tmp_path: Path) -> None:
    with running_server(
        ["--model", str(xsmall_model_dir), "--served-model-name", "xs"], tmp_path / "log"
    ) as url:
        results = validate(lambda: HTTPScorer(url, "xs"), [engine_scorer(xsmall_model_dir)], builtin_cases())
    assert all(result.top1_preserved and result.order_preserved for result in results)
    assert max(result.max_abs_delta for result in results) < 1e-6


@pytest.mark.slow
def test_cli_prints_json(xsmall_model_dir: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "rerankd",
        "validate",
        str(xsmall_model_dir),
        str(xsmall_model_dir),
        "--json",
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    body = json.loads(completed.stdout)
    assert [row["case"] for row in body["results"]] == CASE_NAMES
    assert all(row["max_abs_delta"] == 0.0 and row["order_preserved"] for row in body["results"])


@pytest.mark.slow
def test_cli_compares_dtypes_of_the_base(xsmall_model_dir: Path) -> None:
    model = str(xsmall_model_dir)
    command = [sys.executable, "-m", "rerankd", "validate", model, "--dtype", "float32"]
    completed = subprocess.run(
        [*command, "--compare-dtypes", "float32", "bfloat16", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    rows = json.loads(completed.stdout)["results"]
    assert [row["variant"] for row in rows] == [f"{model} (float32)"] * 4 + [f"{model} (bfloat16)"] * 4
    assert all(row["max_abs_delta"] == 0.0 for row in rows[:4])
    assert all(0.0 < row["max_abs_delta"] < 0.05 for row in rows[4:])
    nothing = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert nothing.returncode == 2 and "--compare-dtypes" in nothing.stderr


@pytest.mark.slow
def test_cli_passes_the_revision_to_the_hub(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "rerankd", "validate", "mixedbread-ai/mxbai-rerank-xsmall-v1"]
    command += ["--compare-dtypes", "bfloat16", "--revision", "v9", "--model-cache", str(tmp_path)]
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert completed.returncode == 1
    assert "revision v9" in completed.stderr
