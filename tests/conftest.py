"""Shared fixtures. Material from ../shared is optional: tests that need it skip where it is absent."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rerankd.backends.base import RerankBackend
from rerankd.backends.registry import FileVariant, load_backend, plan_backend
from rerankd.engine.loader import load_engine
from rerankd.engine.postprocess import sigmoid
from rerankd.engine.precision import case_scores
from rerankd.engine.tokenize import PairTokenizer
from rerankd.fidelity import builtin_cases
from rerankd.settings import RuntimeSettings

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("RERANKD_SHARED_DIR", REPO_ROOT.parent / "shared"))
SHARED_TOKENIZER = SHARED_DIR / "fixtures" / "deberta-v3-tokenizer"
SHARED_CONFIGS = SHARED_DIR / "fixtures" / "configs"
SHARED_DATA = SHARED_DIR / "data"
# The mxbai-rerank package's own environment (`make install-test`): its pins clash with ours.
MXBAI_PYTHON = Path(os.environ.get("MXBAI_REFERENCE_PYTHON", REPO_ROOT / ".venv-mxbai" / "bin" / "python"))

needs_llama_cpp = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed"
)

# The tests' bounds are float32's, whatever CPU runs them: `--dtype auto` keeps bfloat16 on CPUs with bf16
# units (AVX512-BF16 or AMX), which some CI machines have and others lack, and int8 on the others. Servers and
# commands started by the tests read this setting; in process, `cpu_without_bf16_units` below does the same.
# tests/test_precision.py and tests/test_int8.py run the auto policy both ways on purpose.
os.environ["RERANKD_DTYPE"] = "float32"


@pytest.fixture(autouse=True)
def cpu_without_bf16_units(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process models load as on a CPU without bf16 units or an int8 matmul, so `--dtype auto` means
    float32 here too."""
    from rerankd.backends import torch_backend

    monkeypatch.setattr(torch_backend, "cpu_has_bf16_units", lambda: False)
    monkeypatch.setattr(torch_backend, "cpu_has_int8_matmul", lambda: False)


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared material not present: {path}")
    return path


@pytest.fixture(scope="session")
def shared_tokenizer_dir() -> Path:
    """The real DeBERTa-v3 tokenizer files (tokenizer.json, spm.model, tokenizer_config.json)."""
    return _require(SHARED_TOKENIZER)


@pytest.fixture(scope="session")
def shared_configs_dir() -> Path:
    """Real mxbai-rerank config.json files (xsmall, base, large geometry)."""
    return _require(SHARED_CONFIGS)


@pytest.fixture(scope="session")
def msmarco_dir() -> Path:
    """BEIR-format MS MARCO DL19 subset (corpus.jsonl, queries.jsonl, qrels/)."""
    return _require(SHARED_DATA / "msmarco-dl19-subset")


@pytest.fixture(scope="module")
def module_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], Path]]:
    """New folders for a test module's heavy fixtures (models, exports), removed once the module is done:
    kept to the end of the run, the suite's models and exports add up to several GB, more than a CI machine's
    disk may have free."""
    folders: list[Path] = []

    def new_folder(name: str) -> Path:
        folders.append(tmp_path_factory.mktemp(name))
        return folders[-1]

    yield new_folder
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


def _random_model(tmp_path_factory: pytest.TempPathFactory, geometry: str, seed: int = 0) -> Path:
    from rerankd.devtools.random_model import write_random_model

    tokenizer = SHARED_TOKENIZER if SHARED_TOKENIZER.exists() else None
    return write_random_model(
        tmp_path_factory.mktemp(f"random-{geometry}"), geometry, tokenizer_dir=tokenizer, seed=seed
    )


@pytest.fixture(scope="session")
def xsmall_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight model folder at the mxbai-rerank-xsmall geometry (real tokenizer when available), its
    validation scores spread over 0.4-0.6: each case's top document ahead of the next by 0.03, six times
    what bf16 or int8 moves a score, and every faster precision within `--dtype auto`'s bound (measured on
    AMX, with and without the fused attention kernel: bf16 0.004-0.005, bfloat16-mixed 0.001, int8
    0.003-0.005; seed 2 of four)."""
    from rerankd.devtools.random_model import spread_scores

    return spread_scores(_random_model(tmp_path_factory, "xsmall", seed=2), low=0.4, high=0.6)


@pytest.fixture(scope="session")
def base_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight model folder at the mxbai-rerank-base geometry (real tokenizer when available)."""
    return _random_model(tmp_path_factory, "base")


@pytest.fixture(scope="session")
def spread_xsmall(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random xsmall whose validation scores span 0.05-0.95, as a trained reranker's do (its classifier
    fitted, `spread_scores`): there plain bf16 moves scores past `--dtype auto`'s bound."""
    from rerankd.devtools.random_model import spread_scores

    return spread_scores(_random_model(tmp_path_factory, "xsmall", seed=3))


@pytest.fixture(scope="session")
def xsmall_onnx(xsmall_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """xsmall exported by the command users run (`rerankd export --format onnx`): float32, float16 and
    dynamic int8 graphs in onnx/, config.json and the tokenizer beside them."""
    from serving import run_cli

    out = tmp_path_factory.mktemp("xsmall-onnx")
    exported = run_cli(
        "export", str(xsmall_model_dir), str(out), "--format", "onnx", "--type", "f32", "f16", "int8"
    )
    assert exported.returncode == 0, exported.stderr
    assert sorted(path.name for path in (out / "onnx").iterdir()) == [
        "model.onnx",
        "model_fp16.onnx",
        "model_int8.onnx",
    ]
    return out


def load_backend_at(
    path: Path,
    variant: FileVariant | None = None,
    reference_pairs: tuple[tuple[str, str], ...] = (),
    **settings: Any,
) -> RerankBackend:
    """The backend rerankd loads for `path` with these settings (the rest from defaults and the environment),
    planned and loaded as `rerankd serve` does."""
    plan = plan_backend(path, RuntimeSettings(**settings), variant)
    return load_backend(plan, reference_pairs)


def engine_logits(model_dir: Path, dtype: str) -> tuple[str, list[float]]:
    """The dtype an engine loaded with `--dtype dtype` serves, and its logits of the model card's ordering
    case."""
    query, documents = builtin_cases()[3].queries[0]
    engine = load_engine(str(model_dir), RuntimeSettings(dtype=dtype))
    try:
        return engine.info.dtype, asyncio.run(engine.score(query, documents)).logits
    finally:
        engine.close()


def validation_scores(backend: RerankBackend) -> list[list[float]]:
    """The backend's scores of the model card's validation cases, as `--dtype auto`'s check scores them."""
    return case_scores(backend, PairTokenizer(backend.tokenizer, 512), builtin_cases())


def score_error(logits: list[float], expected: list[float]) -> float:
    """max |Δ sigmoid score| between two runs' logits."""
    return max(abs(sigmoid(a) - sigmoid(b)) for a, b in zip(logits, expected, strict=True))
