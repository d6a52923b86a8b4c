"""Device probe, run by `.ci/device check`: is SDPA with the relative bias faster than rerankd's attention?

rerankd's attention is `baddbmm` (the c2p+p2c bias as its addend), softmax and `bmm`. On an H200, SDPA with
a float bias picked cuDNN's kernel, which plans every new batch shape anew (110-320 ms each), so it was left
out; now every shape is captured as a CUDA graph at startup, which pays that once. This times both inside
graphs at serving shapes (base, fp16, random weights) and prints each shape's replay time and how far the
logits moved. It decides nothing by itself: a change to `attend` follows from its numbers, with a test.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from rerankd.backends.base import BackendOptions
from rerankd.backends.cuda_graphs import CapturedPasses
from rerankd.backends.torch_backend import load_safetensors_backend
from rerankd.devtools.random_model import write_random_model
from rerankd.modeling import deberta

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
SHAPES = [(64, 96), (64, 128), (64, 176), (32, 256), (16, 512)]


def sdpa_attend(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """`deberta.attend` through SDPA; the scale is already in the query, so SDPA's own is 1."""
    return F.scaled_dot_product_attention(query, key, value, attn_mask=bias, scale=1.0)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--geometry", default="base")
    parser.add_argument("--dtype", default="float16")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to probe", file=sys.stderr)
        return 1
    device = torch.device("cuda")
    with tempfile.TemporaryDirectory() as folder:
        model_dir = write_random_model(Path(folder), args.geometry, args.tokenizer)
        backend = load_safetensors_backend(model_dir, BackendOptions(device="cuda", dtype=args.dtype))
    model = backend.model
    variants: dict[str, tuple[Attend, list[SDPBackend]]] = {
        "baddbmm": (deberta.attend, []),
        "sdpa": (sdpa_attend, []),  # torch's own choice of kernel
        "sdpa-efficient": (sdpa_attend, [SDPBackend.EFFICIENT_ATTENTION]),
        "sdpa-cudnn": (sdpa_attend, [SDPBackend.CUDNN_ATTENTION]),
    }
    timings: dict[str, dict[tuple[int, int], float]] = {}
    logits: dict[str, dict[tuple[int, int], torch.Tensor]] = {}
    for name, (attend, kernels) in variants.items():
        deberta.attend = attend  # looked up at each call by DebertaLayer.forward
        generator = torch.Generator().manual_seed(0)  # the same batches for every variant
        try:
            # The kernel is chosen when the pass is captured; replays run what was captured.
            with sdpa_kernel(kernels) if kernels else contextlib.nullcontext():
                passes = CapturedPasses(model, device, backend.info.max_length)
                passes.capture_all(SHAPES)
        except RuntimeError as error:
            print(f"{name}: failed to capture ({str(error).splitlines()[0]})")
            continue
        timings[name] = {shape: passes.seconds(*shape) for shape in SHAPES}
        logits[name] = {}
        for pairs, length in SHAPES:
            ids = torch.randint(5, 128000, (pairs, length), generator=generator).pin_memory()
            mask = torch.ones(pairs, length, dtype=torch.long)
            mask[pairs // 2 :, length // 2 :] = 0  # half the pairs padded to half length
            logits[name][(pairs, length)] = passes.run(ids, mask.pin_memory()).float().cpu()
        del passes
        torch.cuda.empty_cache()
    print(f"{args.geometry} {args.dtype} on {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    print("ms per replay; in brackets, the max |Δlogit| against baddbmm on the same batch")
    others = [name for name in timings if name != "baddbmm"]
    print("| pairs x length | baddbmm | " + " | ".join(others) + " |")
    print("|---|---|" + "---|" * len(others))
    for shape in SHAPES:
        cells = [f"{1e3 * timings['baddbmm'][shape]:.2f}"]
        for name in others:
            moved = (logits[name][shape] - logits["baddbmm"][shape]).abs().max().item()
            cells.append(f"{1e3 * timings[name][shape]:.2f} ({moved:.1e})")
        print(f"| {shape[0]} x {shape[1]} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
