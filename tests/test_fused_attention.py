"""The fused attention kernel (rerankd.modeling.fused_attention): built for this CPU and for the instruction
sets other CPUs have, equal to a float64 softmax of the same terms, in use in the model's layers, and absent
without harm where no compiler is."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from rerankd.modeling import fused_attention
from rerankd.modeling.config import DebertaConfig
from rerankd.modeling.deberta import DebertaReranker
from rerankd.modeling.relative import RelativeProjections

from parity import geometry_config, load_ours, padded_batch, wide_checkpoint


def unmarked(tensor: torch.Tensor) -> torch.Tensor:
    """A step boundary that marks nothing."""
    return tensor


needs_compiler = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler on this machine"
)


@pytest.fixture
def fresh_kernel(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """An empty kernel cache, no prebuilt kernel, and the process's loaded kernel forgotten before and after
    the test."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(fused_attention, "PREBUILT", tmp_path / "prebuilt" / "attention.so")
    fused_attention._library.cache_clear()
    yield tmp_path / "rerankd" / "kernels"
    fused_attention._library.cache_clear()


def relative_terms(
    length: int, dtype: torch.dtype
) -> tuple[DebertaReranker, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The xsmall model's relative index with random queries, keys and relative tables in `dtype`, and a
    mask bias padding the second pair past half its length."""
    model = DebertaReranker(DebertaConfig.from_dict(geometry_config("xsmall")))
    generator = torch.Generator().manual_seed(length)
    heads, batch, size, rows = 3, 2, 16, 2 * model.config.relative_span
    query, key = (torch.randn(heads, batch, length, size, generator=generator).to(dtype) for _ in "qk")
    c2p, p2c = (torch.randn(heads, rows, size, generator=generator).to(dtype) for _ in "cp")
    mask_bias = torch.zeros(1, batch, 1, length, dtype=dtype)
    mask_bias[:, 1, :, length // 2 + 1 :] = torch.finfo(dtype).min
    return model, query, key, c2p, p2c, mask_bias


def float64_probabilities(
    model: DebertaReranker, query: torch.Tensor, key: torch.Tensor, c2p: torch.Tensor, p2c: torch.Tensor
) -> torch.Tensor:
    """softmax(q . k + c2p + p2c) over each pair's own keys, in float64, by the terms' definition: one
    gathered table row per (i, j)."""
    length = query.shape[2]
    query, key, c2p, p2c = (tensor.double() for tensor in (query, key, c2p, p2c))
    positions = torch.arange(length)
    offset = model.config.max_position_embeddings - 1
    slots = model.slot_table[positions[:, None] - positions[None, :] + offset]  # (i, j)
    logits = torch.einsum("hbis,hbjs->hbij", query, key)
    logits += torch.einsum("hbis,hijs->hbij", query, c2p[:, slots])
    logits += torch.einsum("hbjs,hijs->hbij", key, p2c[:, slots])
    logits[:, 1, :, length // 2 + 1 :] = -torch.inf
    return torch.softmax(logits, -1)


def real_query_rows(probabilities: torch.Tensor) -> torch.Tensor:
    """(heads, batch, L, L) without the second pair's padding queries, whose rows nothing reads."""
    length = probabilities.shape[2]
    return torch.cat([probabilities[:, 0], probabilities[:, 1, : length // 2 + 1]], 1)


@needs_compiler
def test_the_kernel_builds_for_this_cpu_and_is_kept(fresh_kernel: Path) -> None:
    assert fused_attention.available(torch.empty(0))
    assert fused_attention.available(torch.empty(0, dtype=torch.bfloat16))
    assert not fused_attention.available(torch.empty(0, dtype=torch.float64))
    (built,) = fresh_kernel.glob("*.so")
    modified = built.stat().st_mtime_ns
    assert fused_attention.compiled() == built and built.stat().st_mtime_ns == modified


def cpu_has(instructions: str) -> bool:
    """Whether this CPU runs the kernel's copy for `instructions` (the features it is compiled with)."""
    if instructions == "baseline":
        return True
    if platform.machine() != "x86_64":
        return False
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    flags = set(next(line for line in lines if line.startswith("flags")).split())
    needed = {"avx2", "fma"}
    if instructions == "avx512":
        needed |= {"avx512f", "avx512bw", "avx512dq", "avx512vl"}
    return needed <= flags


@needs_compiler
@pytest.mark.parametrize("instructions", ["baseline", "avx2", "avx512"])
def test_each_copy_of_the_kernel_matches_torch(instructions: str) -> None:
    """One build carries a copy per instruction set: each that this CPU has runs here, so the AVX2-only
    EPYC's and a CPU without AVX's are checked on an AVX-512 machine too."""
    library = fused_attention.load(fused_attention.compiled())
    if not cpu_has(instructions):
        assert not fused_attention.matches_torch(library, instructions), "a copy this CPU cannot run ran"
        pytest.skip(f"this CPU lacks {instructions}")
    assert fused_attention.matches_torch(library, instructions)


@needs_compiler
def test_a_prebuilt_kernel_serves_without_a_compiler(
    fresh_kernel: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """What an image does: built in the builder stage beside its source, loaded where no compiler is."""
    assert fused_attention.prebuild() == fused_attention.PREBUILT
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("PATH", str(tmp_path))
    assert fused_attention.available(torch.empty(0))
    assert not fresh_kernel.exists(), "nothing compiled into the cache"


@needs_compiler
@pytest.mark.parametrize("length", [1, 17, 37, 86, 130, 512])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_probabilities_equal_a_float64_softmax(length: int, dtype: torch.dtype) -> None:
    """Within 1e-5 in float32. In bf16, no further from float64 than torch's own bf16 path (which adds the
    terms in bf16): lengths with partial tiles, one block (17, 37), two (86, 130) and eight (512)."""
    model, query, key, c2p, p2c, mask_bias = relative_terms(length, dtype)
    index = model.relative_index(length)
    probabilities = index.probabilities(mask_bias, query, key, RelativeProjections(c2p, p2c, unmarked))
    assert probabilities is not None
    truth = real_query_rows(float64_probabilities(model, query, key, c2p, p2c))
    fused_error = real_query_rows(probabilities.view(truth.shape[0], 2, length, length)).double() - truth
    if dtype == torch.float32:
        assert fused_error.abs().max() <= 1e-5
        return
    bias = index.attention_bias(mask_bias, query, key, RelativeProjections(c2p, p2c, unmarked))
    rows = (-1, length, query.shape[-1])
    scores = torch.baddbmm(bias.reshape(-1, length, length), query.reshape(rows), key.reshape(rows).mT)
    eager = torch.softmax(scores, -1)
    eager_error = real_query_rows(eager.view(truth.shape[0], 2, length, length)).double() - truth
    assert fused_error.abs().max() <= max(eager_error.abs().max(), 1e-3)


@needs_compiler
def test_every_full_layer_of_the_model_runs_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """All layers but the last (which attends from the first token alone), with the model's logits within
    1e-5 of torch's attention in float32."""
    config = {**geometry_config("xsmall"), "num_hidden_layers": 3}
    model = load_ours(config, wide_checkpoint(config))
    input_ids, attention_mask = padded_batch([40, 25, 33], config["vocab_size"], seed=0)
    calls: list[torch.dtype] = []
    kernel = fused_attention.softmax_in_place

    def counted(scores: torch.Tensor, *args: object) -> bool:
        calls.append(scores.dtype)
        return kernel(scores, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(fused_attention, "softmax_in_place", counted)
    with torch.inference_mode():
        fused = model.relevance_logits(input_ids, attention_mask)
        monkeypatch.setattr(fused_attention, "available", lambda like: False)
        eager = model.relevance_logits(input_ids, attention_mask)
    assert calls == [torch.float32] * (config["num_hidden_layers"] - 1)
    assert torch.allclose(fused, eager, rtol=0, atol=1e-5)


def test_without_a_compiler_attention_stays_in_torch(
    fresh_kernel: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("PATH", str(tmp_path))
    assert not fused_attention.available(torch.empty(0))
    model, query, key, c2p, p2c, mask_bias = relative_terms(37, torch.float32)
    index = model.relative_index(37)
    assert index.probabilities(mask_bias, query, key, RelativeProjections(c2p, p2c, unmarked)) is None


@needs_compiler
def test_the_kernel_refuses_tensors_it_does_not_expect() -> None:
    """It reads by raw pointer: a wrong shape, layout or dtype is refused before it runs."""
    model, query, key, c2p, p2c, mask_bias = relative_terms(40, torch.float32)
    index = model.relative_index(40)
    c2p_product, p2c_product = (
        index._product(content, table, windows)
        for content, table, windows in ((query, c2p, index.c2p_windows), (key, p2c, index.p2c_windows))
    )
    scores = torch.randn(6, 40, 40)
    mask = mask_bias.reshape(2, 40).contiguous()
    wrong = {
        "scores transposed": (scores.transpose(1, 2), c2p_product, p2c_product, mask),
        "scores too short": (scores[:, :39, :39].contiguous(), c2p_product, p2c_product, mask),
        "a term in another dtype": (scores, c2p_product.double(), p2c_product, mask),
        "a term too narrow": (scores, c2p_product[..., :40].contiguous(), p2c_product, mask),
        "the mask in bf16": (scores, c2p_product, p2c_product, mask.bfloat16()),
    }
    for name, tensors in wrong.items():
        before = tensors[0].clone()
        assert not fused_attention.softmax_in_place(*tensors, index.block), name
        assert torch.equal(tensors[0], before), name


@needs_compiler
def test_loading_the_kernel_keeps_subnormal_floats(tmp_path: Path) -> None:
    """Built with -ffast-math, the kernel must not bring GCC's crtfastmath along: its constructor would flush
    subnormals to zero in the whole process (torch's float32, hypothesis' float strategies)."""
    probe = (
        "import torch\n"
        "from rerankd.modeling import fused_attention\n"
        "assert fused_attention.available(torch.empty(0))\n"
        "tiny = torch.tensor([1e-40])\n"
        "print(float(tiny * 1.0), 5e-324 * 1.0)\n"
    )
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    command = [sys.executable, "-c", probe]
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    assert [float(value) for value in result.stdout.split()] == [pytest.approx(1e-40, rel=1e-3), 5e-324]
