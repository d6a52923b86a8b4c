"""DeBERTa's attention bias, mask and softmax in one pass on a CPU, by a small C kernel.

Eager torch spends most of a long-document attention outside its matmuls: the c2p and p2c terms are added to
the scores in separate passes over (heads, batch, L, L) tensors, and the p2c term has to be read transposed,
which torch's element-wise kernels do element by element (docs/decisions.md). `kernels/attention_softmax.c`
reads the scores and both terms once per block of queries, transposes p2c in registers, and writes the
probabilities over the scores.

One build runs on any x86-64 CPU: the kernel carries a copy for AVX-512, one for AVX2 and a baseline one, and
picks the widest the CPU has. An image built with `docker/install.sh` ships it prebuilt beside its source
(`prebuild`); elsewhere it is compiled on first use with the machine's C compiler and kept in the user's
cache, keyed by its source, flags and compiler. Before it is trusted it must match torch on a probe. Where
there is no compiler, or the build or the probe fails, `available()` is False and the model computes
attention with torch alone.

On CPUs with AVX512-BF16, a bfloat16 layer's whole attention runs in one kernel instead
(`kernels/packed_attention.c`, `packed_context`): it reads the fused projection's packed output, computes
each block of 16 queries' scores, relative terms, softmax and context while they are in L1, and writes the
context in packed rows, so no (heads, batch, L, L) tensor is written and no padding computed. Its products
run on AMX tiles where the CPU has AMX-BF16, else as AVX-512 bfloat16 dot products (the engines, `ENGINES`).
It too must match a float64 reference on a probe before it is used.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

KERNELS = Path(__file__).with_name("kernels")
SOURCES = (KERNELS / "threads.c", KERNELS / "attention_softmax.c", KERNELS / "packed_attention.c")
PREBUILT = KERNELS / "attention.so"
# -ffast-math to compile: vectorized exp (glibc's libmvec) and sums; the kernel sees no infinities or NaNs.
# Never when linking: there GCC adds crtfastmath, whose constructor flushes subnormals to zero in the whole
# process that loads the library (torch's float32 included). -fopenmp: the kernels' threads are an OpenMP
# team on torch's own libgomp.so.1 (loaded with torch, before the library), not threads beside its team.
COMPILE_FLAGS = ("-O3", "-mprefer-vector-width=512", "-ffast-math", "-fPIC", "-fopenmp")
LINK_FLAGS = ("-shared", "-fopenmp")
# The kernel's copies, by the number it knows them by: 0 asks for the widest this CPU has.
INSTRUCTION_SETS = {"widest": 0, "baseline": 1, "avx2": 2, "avx512": 3}
KERNEL_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
# The kernel's rows are this many floats longer than L (kernels/attention_softmax.c).
WORKSPACE_ROW_PADDING = 16
COMPILE_TIMEOUT_S = 120
# The probe's largest |Δprobability| against eager torch: bf16 rounding of probabilities below 1.
PROBE_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
# The packed kernel's head size, and the rows of an AMX tile: tables are laid out in groups of this many
# slots (both engines read AMX's operand layouts).
PACKED_HEAD_SIZE = 64
TILE_ROWS = 16
# How far past a pass's length (in distances, either way) the packed kernel reads its slots.
PACKED_SLOT_REACH = 2 * TILE_ROWS
# The packed probe's largest |Δcontext| against float64, for contexts of magnitude about 1: bf16 inputs to
# the products, bf16 probabilities and a bf16 context.
PACKED_PROBE_TOLERANCE = 3e-2
# The packed kernel's engines by the number it knows them by, in the order they are tried, each with the
# oneDNN ISA it stands for (a process capped below it by `ONEDNN_MAX_CPU_ISA` does without it).
ENGINES = {"amx": 1, "avx512_bf16": 2}
ENGINE_ISAS = {"amx": "AVX512_CORE_AMX", "avx512_bf16": "AVX512_CORE_BF16"}
# oneDNN's ISA names for x86-64 (`ONEDNN_MAX_CPU_ISA`), narrowest first; spellings of one level share a rank.
ONEDNN_ISA_RANKS = {
    name: rank
    for rank, names in enumerate(
        [
            ("SSE41",),
            ("AVX",),
            ("AVX2",),
            ("AVX2_VNNI",),
            ("AVX2_VNNI_2",),
            ("AVX512_CORE",),
            ("AVX512_CORE_VNNI",),
            ("AVX512_CORE_BF16",),
            ("AVX512_CORE_FP16", "AVX10_1_512"),
            ("AVX512_CORE_AMX", "AVX10_1_512_AMX"),
            ("AVX512_CORE_AMX_FP16", "AVX10_1_512_AMX_FP16"),
        ]
    )
    for name in names
}


def cache_directory() -> Path:
    """Where compiled kernels are kept: `$XDG_CACHE_HOME/rerankd/kernels`, by default under ~/.cache."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "rerankd" / "kernels"


def available(like: torch.Tensor) -> bool:
    """Whether the kernel runs on tensors like `like` (a CPU tensor of a dtype it has) on this machine."""
    return like.device.type == "cpu" and like.dtype in KERNEL_DTYPES and _library() is not None


def softmax_in_place(
    scores: torch.Tensor, c2p: torch.Tensor, p2c: torch.Tensor, key_mask_bias: torch.Tensor, block: int
) -> bool:
    """Overwrite `scores`, (heads x batch, L, L), with softmax(scores + c2p + p2c + mask) along keys.

    `c2p` and `p2c` are `RelativeIndex`'s banded products, (heads, blocks, batch x block, width), and
    `key_mask_bias` the (batch, L) float32 mask bias. Rows of padding queries become zeros. False, with
    `scores` in an unknown state, where the kernel cannot run them: the caller computes them another way.
    """
    library = _library()
    return library is not None and run(library, scores, c2p, p2c, key_mask_bias, block)


def run(
    library: ctypes.CDLL,
    scores: torch.Tensor,
    c2p: torch.Tensor,
    p2c: torch.Tensor,
    key_mask_bias: torch.Tensor,
    block: int,
    instructions: str = "widest",
) -> bool:
    """`softmax_in_place` by `library`'s copy for `instructions`, once the tensors are checked to hold what
    the kernel reads: it reads and writes by raw pointer, so a shape or layout it does not expect is refused,
    never run."""
    tensors = (scores, c2p, p2c)
    heads, blocks, rows, c2p_width = c2p.shape
    batch, length = key_mask_bias.shape
    threads = torch.get_num_threads()
    if (
        any(not tensor.is_contiguous() or tensor.dtype != scores.dtype for tensor in tensors)
        or scores.dtype not in KERNEL_DTYPES
        or key_mask_bias.dtype != torch.float32
        or not key_mask_bias.is_contiguous()
        or scores.shape != (heads * batch, length, length)
        or p2c.shape[:3] != (heads, blocks, rows)
        or rows != batch * block
        or blocks * block < length
        or c2p_width < length + block - 1
        or p2c.shape[3] < blocks * block + block - 1
    ):
        return False
    # Each thread's block of rows in float32, from torch's allocator: no thread grows a heap of its own.
    workspace = torch.empty(threads * block * (length + WORKSPACE_ROW_PADDING))
    failed = library.attention_softmax(
        *(ctypes.c_void_p(tensor.data_ptr()) for tensor in (*tensors, key_mask_bias, workspace)),
        heads,
        batch,
        length,
        block,
        blocks,
        c2p_width,
        p2c.shape[3],
        threads,
        KERNEL_DTYPES[scores.dtype],
        INSTRUCTION_SETS[instructions],
    )
    return failed == 0


@functools.cache
def _library() -> ctypes.CDLL | None:
    try:
        library = load(PREBUILT if PREBUILT.exists() else compiled())
    except (OSError, subprocess.SubprocessError) as error:
        logger.warning("fused attention kernel unavailable, attention runs in torch alone: %s", error)
        return None
    if not matches_torch(library):
        logger.warning("fused attention kernel disagrees with torch on a probe; attention stays in torch")
        return None
    return library


def prebuild() -> Path:
    """Compile the kernels beside their sources, where an installed package finds them without a compiler
    (the images' builder stage runs this)."""
    return _compile(PREBUILT)


def compiled() -> Path:
    """The kernels' shared library, compiled once into the user's cache."""
    compiler = _compiler()
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, check=True, timeout=COMPILE_TIMEOUT_S
    ).stdout
    flags = " ".join((*COMPILE_FLAGS, *LINK_FLAGS)).encode()
    key = hashlib.sha256(
        b"\0".join([*(source.read_bytes() for source in SOURCES), flags, version])
    ).hexdigest()
    target = cache_directory() / f"attention-{key[:16]}.so"
    if not target.exists():
        _compile(target)
        logger.info("fused attention kernel compiled: %s", target)
    return target


def load(path: Path) -> ctypes.CDLL:
    """A compiled kernel, its function typed."""
    library = ctypes.CDLL(str(path))
    library.attention_softmax.restype = ctypes.c_int
    library.attention_softmax.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 10
    library.packed_attention_ready.restype = ctypes.c_int
    library.packed_attention_ready.argtypes = [ctypes.c_int]
    library.packed_attention_workspace.restype = ctypes.c_size_t
    library.packed_attention_workspace.argtypes = [ctypes.c_int]
    library.packed_attention.restype = ctypes.c_int
    library.packed_attention.argtypes = [ctypes.c_void_p] * 8 + [ctypes.c_int] * 6
    return library


def _compiler() -> str:
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler (cc or gcc) on PATH")
    return compiler


def _compile(target: Path) -> Path:
    """Compile the sources into `target`, built beside it and renamed over it: processes starting together
    never load a partial file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    compiler = _compiler()
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        objects = [str(Path(scratch) / source.with_suffix(".o").name) for source in SOURCES]
        for command in (
            *(
                [compiler, *COMPILE_FLAGS, "-c", str(source), "-o", compiled_object]
                for source, compiled_object in zip(SOURCES, objects, strict=True)
            ),
            [compiler, *LINK_FLAGS, *objects, "-o", str(built), "-lm"],
        ):
            result = subprocess.run(command, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
            if result.returncode != 0:
                raise OSError(f"the C compiler failed: {result.stderr.strip()[-500:]}")
        os.replace(built, target)
    return target


def matches_torch(library: ctypes.CDLL, instructions: str = "widest") -> bool:
    """The kernel's copy for `instructions` against torch on a random case with partial tiles, two blocks
    and a padded pair: False also where this CPU lacks those instructions."""
    generator = torch.Generator().manual_seed(0)
    heads, batch, length, block = 2, 2, 40, 20
    blocks, width = length // block, length + block - 1
    mask = torch.zeros(batch, length)
    mask[1, 33:] = torch.finfo(torch.float32).min
    for dtype, tolerance in PROBE_TOLERANCE.items():
        scores, c2p, p2c = (
            torch.randn(shape, generator=generator).to(dtype)
            for shape in ((heads * batch, length, length), *[(heads, blocks, batch * block, width)] * 2)
        )
        expected = reference_softmax(scores, c2p, p2c, mask, block)
        if not run(library, scores, c2p, p2c, mask, block, instructions):
            return False
        tokens = mask.repeat(heads, 1) == 0  # (heads x batch, L): rows of real queries
        if (scores.double() - expected)[tokens].abs().max() > tolerance:
            return False
    return True


def reference_softmax(
    scores: torch.Tensor, c2p: torch.Tensor, p2c: torch.Tensor, key_mask_bias: torch.Tensor, block: int
) -> torch.Tensor:
    """What `softmax_in_place` computes, in float64 by plain indexing: the kernel's layouts, spelled out."""
    heads = c2p.shape[0]
    batch, length = key_mask_bias.shape
    h, b, i, j = torch.meshgrid(*(torch.arange(n) for n in (heads, batch, length, length)), indexing="ij")
    c2p_terms = c2p.double()[h, i // block, b * block + i % block, block - 1 - i % block + j]
    p2c_terms = p2c.double()[h, j // block, b * block + j % block, block - 1 - j % block + i]
    logits = scores.double().view(heads, batch, length, length) + c2p_terms + p2c_terms
    logits = logits + key_mask_bias.double()[None, :, None, :]
    return torch.softmax(logits, -1).view(heads * batch, length, length)


@dataclass(frozen=True)
class PackedKernel:
    """The compiled library and the engine of its products it runs here."""

    library: ctypes.CDLL
    engine: str


def packed_available(like: torch.Tensor) -> bool:
    """Whether the packed kernel attends tensors like `like` (bfloat16 on a CPU) on this machine: a CPU with
    AVX512-BF16 (or AMX-BF16) whose kernel matched float64 on the probe."""
    return like.device.type == "cpu" and like.dtype == torch.bfloat16 and packed_kernel() is not None


def packed_tables(
    relative_keys: torch.Tensor, relative_queries: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's (heads, slots, 64) relative tables as the packed kernel reads them: the key projection's
    `tiled` (the B operand of the c2p products), the query projection's as rows (their A operand, against
    the keys), both padded with zero rows to a multiple of 16 slots."""
    return tiled(relative_keys), padded_slots(relative_queries).contiguous()


def padded_slots(table: torch.Tensor) -> torch.Tensor:
    """A (heads, slots, 64) table with zero rows added to a multiple of 16 slots."""
    return torch.nn.functional.pad(table, (0, 0, 0, -table.shape[1] % TILE_ROWS))


def tiled(table: torch.Tensor) -> torch.Tensor:
    """A (heads, slots, 64) relative table as AMX's B operands: (heads, slots / 16, 2, 16, 32), group g,
    half s, row kk holding (t[16g + n, 32s + 2kk], t[16g + n, 32s + 2kk + 1]) for n < 16; slots padded with
    zero rows to a multiple of 16."""
    table = padded_slots(table)
    heads, groups = table.shape[0], table.shape[1] // TILE_ROWS
    half = PACKED_HEAD_SIZE // 2
    by_pair = table.reshape(heads, groups, TILE_ROWS, 2, half // 2, 2)
    return by_pair.permute(0, 1, 3, 4, 2, 5).contiguous().view(heads, groups, 2, TILE_ROWS, half)


def packed_context(
    qkv: torch.Tensor,
    spans: torch.Tensor,
    key_tiles: torch.Tensor,
    query_table: torch.Tensor,
    distance_slots: torch.Tensor,
    length: int,
    kernel: PackedKernel | None = None,
) -> torch.Tensor | None:
    """The attention context of every pair's tokens, (rows of `qkv`, heads x 64), by the packed kernel: `qkv`
    is the fused projection's output over a batch's packed tokens (Q, K, V, each heads x 64 wide, the scale
    in Q), `spans` (2, pairs) int32 each pair's first row and token count, `key_tiles` and `query_table` the
    layer's relative tables through the key and query projections (`packed_tables`), and `distance_slots`
    int32, the slot of the distance -k at k + reach for |k| <= reach = `length` + `PACKED_SLOT_REACH`. Rows
    past the tokens are zeros. By `kernel` where given, else by this machine's probed kernel.

    The kernel reads by raw pointer: tensors of a shape, dtype or layout it does not expect are refused,
    never run. None then, and where the kernel cannot run them: the caller attends another way."""
    kernel = kernel or packed_kernel()
    if kernel is None:
        return None
    heads, groups = key_tiles.shape[:2]
    hidden = heads * PACKED_HEAD_SIZE
    reach = length + PACKED_SLOT_REACH
    pairs = spans.shape[1]
    if (
        any(not tensor.is_contiguous() for tensor in (qkv, spans, key_tiles, query_table, distance_slots))
        or any(tensor.dtype != torch.bfloat16 for tensor in (qkv, key_tiles, query_table))
        or spans.dtype != torch.int32
        or distance_slots.dtype != torch.int32
        or qkv.dim() != 2
        or qkv.shape[1] != 3 * hidden
        or key_tiles.shape != (heads, groups, 2, TILE_ROWS, PACKED_HEAD_SIZE // 2)
        or query_table.shape != (heads, groups * TILE_ROWS, PACKED_HEAD_SIZE)
        or spans.shape != (2, pairs)
        or distance_slots.shape != (2 * reach + 1,)
        or pairs == 0
        or int(spans[1].max()) > length
        or int(spans[1].min()) < 1
        or int(spans[0].min()) < 0
        or int((spans[0] + spans[1]).max()) > qkv.shape[0]
        or int(distance_slots.min()) < 0
        or int(distance_slots.max()) >= groups * TILE_ROWS
        or not unit_steps(distance_slots)
    ):
        return None
    threads = torch.get_num_threads()
    context = qkv.new_empty(qkv.shape[0], hidden)
    tokens = int(spans[0, -1] + spans[1, -1])
    context[tokens:] = 0
    # Each thread's buffers, from torch's allocator: no thread grows a heap of its own.
    library = kernel.library
    workspace = torch.empty(threads * library.packed_attention_workspace(length), dtype=torch.uint8)
    failed = library.packed_attention(
        *(ctypes.c_void_p(tensor.data_ptr()) for tensor in (qkv, context, spans[0], spans[1])),
        *(ctypes.c_void_p(tensor.data_ptr()) for tensor in (key_tiles, query_table)),
        ctypes.c_void_p(distance_slots.data_ptr() + reach * distance_slots.element_size()),
        ctypes.c_void_p(workspace.data_ptr()),
        heads,
        pairs,
        groups,
        length,
        threads,
        ENGINES[kernel.engine],
    )
    return None if failed else context


def onednn_allows(isa: str) -> bool:
    """False where `ONEDNN_MAX_CPU_ISA` caps oneDNN below `isa` (an `ONEDNN_ISA_RANKS` name): an engine of
    the packed kernel then stands down as well, so a capped process runs what a CPU without that ISA runs
    (the kernel-path tests check those paths on one machine so). A cap oneDNN knows and we do not allows."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    return ONEDNN_ISA_RANKS.get(cap, len(ONEDNN_ISA_RANKS)) >= ONEDNN_ISA_RANKS[isa]


def unit_steps(distance_slots: torch.Tensor) -> bool:
    """Whether the slot of the distance -k falls by 0 or 1 at each step of k: so the slots a run of distances
    reaches are no more than the distances, and a run's products fit the kernel's buffers."""
    steps = distance_slots[:-1] - distance_slots[1:]
    return bool(((steps == 0) | (steps == 1)).all())


def engines_here(library: ctypes.CDLL) -> list[str]:
    """The packed kernel's engines that run on this CPU, under this process's oneDNN cap, fastest first."""
    return [
        engine
        for engine, number in ENGINES.items()
        if onednn_allows(ENGINE_ISAS[engine]) and library.packed_attention_ready(number)
    ]


@functools.cache
def packed_kernel() -> PackedKernel | None:
    """The fastest engine of the packed kernel that runs here and matched float64 on the probe."""
    library = _library()
    if library is None:
        return None
    for engine in engines_here(library):
        kernel = PackedKernel(library, engine)
        if matches_reference(kernel):
            return kernel
        logger.warning("packed attention kernel (%s) disagrees with float64 on a probe", engine)
    return None


def matches_reference(kernel: PackedKernel) -> bool:
    """The packed kernel against `reference_context` on a random case: pairs of 5, 40 and 17 tokens (partial
    tiles, a partial step of 32 keys, three blocks), two heads, a bucketed slot map."""
    generator = torch.Generator().manual_seed(0)
    heads, lengths, slots = 2, [5, 40, 17], 48
    spans = torch.tensor([[0, 5, 45], lengths], dtype=torch.int32)
    qkv = (0.5 * torch.randn(sum(lengths), 3 * heads * PACKED_HEAD_SIZE, generator=generator)).bfloat16()
    key_table, query_table = (
        (0.3 * torch.randn(heads, slots, PACKED_HEAD_SIZE, generator=generator)).bfloat16() for _ in "kq"
    )
    length = max(lengths)
    reach = length + PACKED_SLOT_REACH
    distances = -torch.arange(-reach, reach + 1)
    # slot(d): d itself near 0, halved beyond 8 either way, within the table
    distance_slots = torch.where(distances.abs() <= 8, distances, distances // 2 + 4 * distances.sign())
    distance_slots = (distance_slots + slots // 2).clamp(0, slots - 1).int()
    tables = packed_tables(key_table, query_table)
    context = packed_context(qkv, spans, *tables, distance_slots, length, kernel)
    if context is None:
        return False
    expected = reference_context(qkv, spans, key_table, query_table, distance_slots)
    return bool((context.double() - expected).abs().max() <= PACKED_PROBE_TOLERANCE)


def reference_context(
    qkv: torch.Tensor,
    spans: torch.Tensor,
    key_table: torch.Tensor,
    query_table: torch.Tensor,
    distance_slots: torch.Tensor,
) -> torch.Tensor:
    """What `packed_context` computes, in float64 by plain indexing, from the untiled (heads, slots, 64)
    tables."""
    heads = key_table.shape[0]
    reach = (len(distance_slots) - 1) // 2
    context = torch.zeros(qkv.shape[0], heads * PACKED_HEAD_SIZE, dtype=torch.float64)
    key_table, query_table = key_table.double(), query_table.double()
    for first, count in spans.t().tolist():
        rows = qkv[first : first + count].double().view(count, 3, heads, PACKED_HEAD_SIZE)
        positions = torch.arange(count)
        slots = distance_slots[reach + positions[None, :] - positions[:, None]]  # (i, j): slot of i - j
        query, key, value = rows.unbind(1)  # (count, heads, 64)
        logits = torch.einsum("ihs,jhs->hij", query, key)
        logits += torch.einsum("ihs,hijs->hij", query, key_table[:, slots])
        logits += torch.einsum("jhs,hijs->hij", key, query_table[:, slots])
        weighted = torch.einsum("hij,jhs->ihs", torch.softmax(logits, -1), value)
        context[first : first + count] = weighted.reshape(count, -1)
    return context
