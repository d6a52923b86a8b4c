"""The packed attention kernel (rerankd.modeling.fused_attention.packed_context): a bfloat16 layer's whole
attention over packed pairs, equal to a float64 softmax of the same terms within its bf16 roundings, by each
engine this CPU runs (AMX tiles on Intel's AMX CPUs, AVX-512 bf16 dot products there and on the AMD EPYCs),
in use in every full layer of a bf16 model, and standing down where it must. An engine's tests are skipped
on CPUs without it; on CPUs with neither (AVX2) the other paths run, and tests/test_fused_attention.py checks
them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from rerankd.bench.profile import OTHER, kind_of
from rerankd.engine.precision import MAX_SCORE_DELTA
from rerankd.modeling import fused_attention
from rerankd.modeling.config import DebertaConfig
from rerankd.modeling.deberta import PACKED_ATTENTION_OP, TokenLayout
from rerankd.modeling.relative import RelativeIndex, relative_slot_table

from parity import (
    bf16_score_drift,
    bf16_truth,
    geometry_config,
    load_ours,
    padded_batch,
    wide_checkpoint,
)

LIBRARY = fused_attention._library()
ENGINES_HERE = fused_attention.engines_here(LIBRARY) if LIBRARY is not None else []
needs_packed = pytest.mark.skipif(
    not fused_attention.packed_available(torch.empty(0, dtype=torch.bfloat16)),
    reason="this CPU lacks AVX512-BF16 and AMX-BF16 (or the kernel is not built here)",
)
needs_amx = pytest.mark.skipif("amx" not in ENGINES_HERE, reason="this CPU lacks AMX-BF16")
every_engine = pytest.mark.parametrize(
    "engine",
    [
        pytest.param(engine, marks=pytest.mark.skipif(engine not in ENGINES_HERE, reason=f"no {engine} here"))
        for engine in fused_attention.ENGINES
    ],
)

HEADS = 3


def kernel_of(engine: str) -> fused_attention.PackedKernel:
    assert LIBRARY is not None
    return fused_attention.PackedKernel(LIBRARY, engine)


def base_distance_slots(length: int) -> torch.Tensor:
    """The base geometry's relative slots (256 buckets over 512 positions) of a length-`length` batch's
    distances, as the model hands them to the kernel."""
    config = DebertaConfig.from_dict(geometry_config("base"))
    slot_table = relative_slot_table(config)
    return RelativeIndex.for_length(slot_table, config.max_position_embeddings, length).distance_slots


def packed_case(
    lengths: list[int], seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A packed batch's fused projection output, its spans, random relative tables of the base geometry's
    512 slots, and its distances' slots."""
    generator = torch.Generator().manual_seed(seed)
    spans = torch.tensor([[sum(lengths[:pair]) for pair in range(len(lengths))], lengths], dtype=torch.int32)
    width = HEADS * fused_attention.PACKED_HEAD_SIZE
    qkv = (0.5 * torch.randn(sum(lengths), 3 * width, generator=generator)).bfloat16()
    key_table, query_table = (
        (0.3 * torch.randn(HEADS, 512, fused_attention.PACKED_HEAD_SIZE, generator=generator)).bfloat16()
        for _ in "kq"
    )
    distance_slots = base_distance_slots(max(lengths))
    return qkv, spans, key_table, query_table, distance_slots


@every_engine
@pytest.mark.parametrize("lengths", [[1], [5, 40, 17], [17, 33], [100, 64, 3], [512], [300, 512, 7]], ids=str)
def test_the_context_equals_a_float64_softmax(engine: str, lengths: list[int]) -> None:
    """Within the two bf16 roundings it makes: each probability's and the context's own, each at most 2^-9
    relatively, so |Δ| <= 2^-8 max |v| (with a quarter's margin for the float32 sums): partial tiles, a
    partial step of 32 keys, pairs longer and shorter than the batch's longest, one at the model's limit."""
    qkv, spans, key_table, query_table, distance_slots = packed_case(lengths)
    tables = fused_attention.packed_tables(key_table, query_table)
    context = fused_attention.packed_context(
        qkv, spans, *tables, distance_slots, max(lengths), kernel_of(engine)
    )
    assert context is not None
    expected = fused_attention.reference_context(qkv, spans, key_table, query_table, distance_slots)
    values = qkv[:, 2 * HEADS * fused_attention.PACKED_HEAD_SIZE :].double()
    assert (context.double() - expected).abs().max() <= 1.25 * 2**-8 * values.abs().max()


@every_engine
def test_a_wrong_term_is_caught(engine: str) -> None:
    """The bound bites: the reference with the p2c table's slots shifted by one, or c2p left out, is far
    outside it."""
    qkv, spans, key_table, query_table, distance_slots = packed_case([5, 40, 17])
    tables = fused_attention.packed_tables(key_table, query_table)
    context = fused_attention.packed_context(qkv, spans, *tables, distance_slots, 40, kernel_of(engine))
    assert context is not None
    bound = 1.25 * 2**-8 * qkv[:, 2 * HEADS * fused_attention.PACKED_HEAD_SIZE :].double().abs().max()
    mutants = {
        "p2c one slot off": (key_table, query_table.roll(1, 1)),
        "no c2p": (torch.zeros_like(key_table), query_table),
    }
    for name, (keys, queries) in mutants.items():
        wrong = fused_attention.reference_context(qkv, spans, keys, queries, distance_slots)
        assert (context.double() - wrong).abs().max() > 10 * bound, name


@needs_packed
def test_the_kernel_refuses_tensors_it_does_not_expect() -> None:
    """It reads by raw pointer: a wrong shape, dtype or span is refused before it runs."""
    qkv, spans, key_table, query_table, distance_slots = packed_case([5, 40, 17])
    key_tiles, query_rows = fused_attention.packed_tables(key_table, query_table)
    arguments = (qkv, spans, key_tiles, query_rows, distance_slots, 40)
    assert fused_attention.packed_context(*arguments) is not None
    jumping = distance_slots.clone()  # near k = 0 the slots fall by 2 from one distance to the next
    middle = len(jumping) // 2
    jumping[:middle] = (jumping[:middle] + 1).clamp(max=int(distance_slots.max()))
    before_the_rows = spans.clone()
    before_the_rows[0, 0] = -1
    past_the_rows = spans.clone()
    past_the_rows[1, -1] += 1
    wrong = {
        "qkv in float32": (qkv.float(), *arguments[1:]),
        "qkv one head short": (qkv[:, :-64].contiguous(), *arguments[1:]),
        "a pair past the rows": (qkv, past_the_rows, *arguments[2:]),
        "a pair before the first row": (qkv, before_the_rows, *arguments[2:]),
        "a pair longer than the length": (*arguments[:5], 39),
        "the query table tiled": (qkv, spans, key_tiles, key_tiles, distance_slots, 40),
        "slots of a shorter batch": (*arguments[:4], distance_slots[1:-1].contiguous(), 40),
        "slots rising with k": (*arguments[:4], distance_slots.flip(0).contiguous(), 40),
        "slots falling by 2 once": (*arguments[:4], jumping, 40),
        "spans in int64": (qkv, spans.long(), *arguments[2:]),
    }
    for name, tensors in wrong.items():
        assert fused_attention.packed_context(*tensors) is None, name


@needs_amx
def test_before_linux_grants_the_tiles_the_kernel_refuses_rather_than_faults(tmp_path) -> None:
    """A tile instruction before the process asked for the tiles' state kills it (SIGILL): the library,
    loaded afresh in a new process, refuses until `packed_attention_ready` has granted them."""
    probe = (
        "import torch\n"
        "from rerankd.modeling import fused_attention as f\n"
        "library = f.load(f.compiled())\n"
        "qkv = torch.randn(8, 3 * 64).bfloat16()\n"
        "spans = torch.tensor([[0], [8]], dtype=torch.int32)\n"
        "tables = f.packed_tables(*torch.randn(2, 1, 16, 64).bfloat16())\n"
        "slots = torch.full((2 * (8 + f.PACKED_SLOT_REACH) + 1,), 7, dtype=torch.int32)\n"
        "arguments = (qkv, spans, *tables, slots, 8, f.PackedKernel(library, 'amx'))\n"
        "print(f.packed_context(*arguments) is None)\n"
        "ready = library.packed_attention_ready(f.ENGINES['amx'])\n"
        "print(ready, f.packed_context(*arguments) is not None)\n"
    )
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True
    )
    assert result.stdout.split() == ["True", "1", "True"]


@needs_packed
def test_every_full_layer_of_a_bf16_model_runs_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """All layers but the last (which attends from the first token alone), on right-padded pairs; and the
    model's scores hold `--dtype auto`'s bound against the float64 reference."""
    calls: list[int] = []
    kernel = fused_attention.packed_context

    def counted(qkv: torch.Tensor, *args: object) -> torch.Tensor | None:
        calls.append(len(qkv))
        return kernel(qkv, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(fused_attention, "packed_context", counted)
    config = geometry_config("xsmall")
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        drift = bf16_score_drift(config, *bf16_truth(config))
    assert len(calls) == config["num_hidden_layers"] - 1
    assert drift <= MAX_SCORE_DELTA
    # its time is named where the bench's profile finds it
    (event,) = [event for event in profiler.key_averages() if event.key == PACKED_ATTENTION_OP]
    assert event.count == len(calls)
    assert kind_of(PACKED_ATTENTION_OP) != OTHER


def test_left_padded_pairs_are_not_given_to_the_kernel() -> None:
    """The kernel takes each pair's tokens as its first positions: a right-padded mask gives it the pairs'
    spans, any other none (those pairs attend by the other path)."""
    _, right = padded_batch([3, 5, 2], vocab=100, seed=0)
    layout = TokenLayout.from_mask(right, row_multiple=64)
    assert layout.pair_spans is not None and layout.pair_spans.tolist() == [[0, 3, 8], [3, 5, 2]]
    assert TokenLayout.from_mask(right.flip(1)).pair_spans is None


def test_an_engine_stands_down_where_onednn_is_capped_below_its_isa(monkeypatch: pytest.MonkeyPatch) -> None:
    """`ONEDNN_MAX_CPU_ISA` below AMX gives the paths a CPU without AMX runs, below AVX512_CORE_BF16 those of
    a CPU without bf16 units (how the kernel-path tests check them on one machine)."""
    for cap, allowed in [
        ("AVX2", set()),
        ("AVX512_CORE_VNNI", set()),
        ("AVX512_CORE_BF16", {"avx512_bf16"}),
        ("avx10_1_512", {"avx512_bf16"}),
        ("AVX512_CORE_AMX", {"amx", "avx512_bf16"}),
        ("ALL", {"amx", "avx512_bf16"}),
    ]:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
        isas = fused_attention.ENGINE_ISAS
        assert {engine for engine, isa in isas.items() if fused_attention.onednn_allows(isa)} == allowed
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    assert fused_attention.onednn_allows("AVX512_CORE_AMX")


@needs_packed
def test_a_float32_model_keeps_the_other_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel is bf16's: float32 layers attend by the fused softmax kernel and torch, as before."""
    calls: list[object] = []
    monkeypatch.setattr(fused_attention, "packed_context", lambda *args: calls.append(args))
    config = {**geometry_config("xsmall"), "num_hidden_layers": 2}
    model = load_ours(config, wide_checkpoint(config))
    input_ids, mask = padded_batch([9, 4], config["vocab_size"], seed=1)
    with torch.inference_mode():
        model(input_ids, mask)
    assert calls == []
