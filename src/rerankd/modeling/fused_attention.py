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
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels") / "attention_softmax.c"
PREBUILT = SOURCE.with_suffix(".so")
# -ffast-math to compile: vectorized exp (glibc's libmvec) and sums; the kernel sees no infinities or NaNs.
# Never when linking: there GCC adds crtfastmath, whose constructor flushes subnormals to zero in the whole
# process that loads the library (torch's float32 included).
COMPILE_FLAGS = ("-O3", "-mprefer-vector-width=512", "-ffast-math", "-fPIC", "-pthread")
LINK_FLAGS = ("-shared", "-pthread")
# The kernel's copies, by the number it knows them by: 0 asks for the widest this CPU has.
INSTRUCTION_SETS = {"widest": 0, "baseline": 1, "avx2": 2, "avx512": 3}
KERNEL_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
# The kernel's rows are this many floats longer than L (kernels/attention_softmax.c).
WORKSPACE_ROW_PADDING = 16
COMPILE_TIMEOUT_S = 120
# The probe's largest |Δprobability| against eager torch: bf16 rounding of probabilities below 1.
PROBE_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


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
    """Compile the kernel beside its source, where an installed package finds it without a compiler (the
    images' builder stage runs this)."""
    return _compile(PREBUILT)


def compiled() -> Path:
    """The kernel's shared library, compiled once into the user's cache."""
    compiler = _compiler()
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, check=True, timeout=COMPILE_TIMEOUT_S
    ).stdout
    flags = " ".join((*COMPILE_FLAGS, *LINK_FLAGS)).encode()
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), flags, version])).hexdigest()
    target = cache_directory() / f"attention_softmax-{key[:16]}.so"
    if not target.exists():
        _compile(target)
        logger.info("fused attention kernel compiled: %s", target)
    return target


def load(path: Path) -> ctypes.CDLL:
    """A compiled kernel, its function typed."""
    library = ctypes.CDLL(str(path))
    library.attention_softmax.restype = ctypes.c_int
    library.attention_softmax.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 10
    return library


def _compiler() -> str:
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler (cc or gcc) on PATH")
    return compiler


def _compile(target: Path) -> Path:
    """Compile the source to `target`, built beside it and renamed over it: processes starting together
    never load a partial file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    compiler = _compiler()
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built, compiled_object = Path(scratch) / target.name, Path(scratch) / "attention_softmax.o"
        for command in (
            [compiler, *COMPILE_FLAGS, "-c", str(SOURCE), "-o", str(compiled_object)],
            [compiler, *LINK_FLAGS, str(compiled_object), "-o", str(built), "-lm"],
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
