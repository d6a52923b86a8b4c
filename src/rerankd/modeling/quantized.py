"""Dense layers in int8 on a CPU, through oneDNN: `--dtype int8`.

Each weight is quantized once, symmetric int8 per output channel, and reordered into oneDNN's blocked layout;
each input is quantized as it arrives, asymmetric uint8 with one scale per tensor (dynamic quantization, as
ONNX Runtime's `quantize_dynamic` does), and oneDNN's int8 matmul returns float32 with the bias added. On
CPUs with AVX2, AVX512-VNNI or AMX-INT8, oneDNN's int8 kernels run several times the multiply-adds per
instruction that its float32 ones do; the rest of the network (embeddings, norms, attention, the head) stays
in float32 (docs/decisions.md).

Without VNNI (AVX2, AVX512 before VNNI) oneDNN sums pairs of uint8 x int8 products in int16, which
saturates past 32,767: 255 x 127 x 2 does. There the weights take 7 bits (±63), which cannot; where a probe
finds the sums exact (VNNI, AMX), 8 bits.

The ops are torch's own (`torch.ops.onednn`, what inductor's x86 quantization emits), not public API, so
`quantize_dense_layers` first checks on one layer that they exist and give `F.linear`'s result within int8's
rounding, and otherwise leaves the model as is.
"""

from __future__ import annotations

import functools
import logging
import statistics
import warnings
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from rerankd.modeling.onednn import alternate_timings, pack_dense_layers

logger = logging.getLogger(__name__)

UINT8_MAX = 255
INT8_LEVELS = 127  # weights' largest level where oneDNN's sums cannot saturate
INT7_LEVELS = 63  # where they can: 255 x 63 x 2 fits int16
# torch 2.13 deprecates creating quantized tensors; `quantize_activations` creates one only as a fast
# quantizer and reads its storage at once. Once torch removes the op, the probe finds int8 unavailable.
warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor.* deprecated", category=UserWarning)
# A probe layer's int8 result may differ from float32 by this much, relative to the output's largest value.
PROBE_TOLERANCE = 0.05
# The dense layer `int8_dense_speedup` times, base's 768 -> 3,072 over a CPU batch's 1,024 rows, and how
# many times in each precision (a few milliseconds each on AVX512-BF16).
SPEEDUP_PROBE_SHAPE = (1024, 768, 3072)
SPEEDUP_PROBE_RUNS = 15


class Int8Linear(nn.Module):
    """`nn.Linear` with per-channel int8 weights in oneDNN's layout; inputs quantized per call. The output
    comes in the input's dtype, float32 or bfloat16 (oneDNN writes bf16 directly, half the bytes)."""

    def __init__(self, linear: nn.Linear, batch_rows: int, levels: int) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float()
        scales = (weight.abs().amax(1) / levels).clamp(min=torch.finfo(torch.float32).tiny)
        quantized = torch.round(weight / scales[:, None]).clamp(-levels, levels).to(torch.int8)
        # The layout is chosen for `batch_rows` rows (the engine's padded-token budget); any count runs.
        packed = torch.ops.onednn.qlinear_prepack(quantized, [batch_rows, self.in_features])
        self.register_buffer("weight", packed)
        self.register_buffer("weight_scales", scales)
        self.register_buffer("weight_zero_points", torch.zeros(self.out_features, dtype=torch.int64))
        bias = linear.bias
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        scale, zero_point, quantized = quantize_activations(inputs.float())
        return torch.ops.onednn.qlinear_pointwise(
            quantized,
            scale,
            zero_point,
            self.weight,
            self.weight_scales,
            self.weight_zero_points,
            self.bias,
            1.0,
            0,
            inputs.dtype,
            "none",
            [],
            "",
        )

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 oneDNN weight"


def quantize_activations(inputs: torch.Tensor) -> tuple[float, int, torch.Tensor]:
    """(scale, zero point, uint8 values) of float32 `inputs`, asymmetric over the tensor's range widened to
    hold zero (exact zero, as padding and ReLU need). One pass of torch's `quantize_per_tensor`, its storage
    then read as a plain uint8 tensor (`int_repr` would copy it): the levels of dividing, rounding, shifting
    and clamping op by op, in a third of their time (docs/decisions.md)."""
    low, high = (bound.item() for bound in torch.aminmax(inputs))
    low, high = min(low, 0.0), max(high, 0.0)
    scale = max((high - low) / UINT8_MAX, torch.finfo(torch.float32).tiny)
    zero_point = round(-low / scale)
    quantized = torch.quantize_per_tensor(inputs, scale, zero_point, torch.quint8)
    levels = torch.empty(0, dtype=torch.uint8)
    return (
        scale,
        zero_point,
        levels.set_(
            quantized.untyped_storage(), quantized.storage_offset(), quantized.shape, quantized.stride()
        ),
    )


def int8_available() -> bool:
    """Whether this torch has oneDNN's int8 matmul on this CPU (x86 builds do)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")


@functools.cache
def weight_levels() -> int:
    """8-bit weights where oneDNN's int8 matmul sums exactly, 7-bit where a worst case saturates it: every
    input at the top of the uint8 range against every weight at the top of the int8 range."""
    worst = nn.Linear(64, 16, bias=False)
    with torch.inference_mode():
        worst.weight.fill_(1.0)
        inputs = torch.ones(4, 64)
        inputs[0, 0] = 0.0  # zero point 0: every other input quantizes to 255
        exact = F.linear(inputs, worst.weight)
        measured = Int8Linear(worst, 4, INT8_LEVELS)(inputs)
    return INT8_LEVELS if torch.allclose(measured, exact, rtol=0.01) else INT7_LEVELS


def quantize_dense_layers(layers: Iterable[nn.Module], batch_rows: int) -> bool:
    """Swap every float32 `nn.Linear` inside `layers` (the network's repeated blocks: the embeddings and the
    head stay float32) for an `Int8Linear`, one at a time. False, with nothing changed, where oneDNN's int8
    ops are missing or disagree with `F.linear` on a probe."""
    names = [
        (parent, name)
        for layer in layers
        for parent in layer.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear and child.weight.dtype == torch.float32 and child.weight.is_cpu
    ]
    if not names or not int8_available() or not _quantizes(getattr(*names[0]), batch_rows):
        return False
    levels = weight_levels()
    for parent, name in names:
        setattr(parent, name, Int8Linear(getattr(parent, name), batch_rows, levels))
    return True


def _quantizes(linear: nn.Linear, batch_rows: int) -> bool:
    probe = torch.linspace(-1, 1, 3 * linear.in_features).view(3, -1)
    try:
        with torch.inference_mode():
            quantized = Int8Linear(linear, batch_rows, weight_levels())(probe)
            plain = F.linear(probe, linear.weight, linear.bias)
    except (AttributeError, RuntimeError, NotImplementedError) as error:
        logger.info("oneDNN int8 matmul is unavailable in this torch (%s)", error)
        return False
    return bool((quantized - plain).abs().max() <= PROBE_TOLERANCE * plain.abs().max())


@functools.cache
def int8_dense_speedup() -> float:
    """How many times faster a dense layer runs in int8 than in bf16 on this CPU, each as a bf16 network
    runs it (packed for oneDNN where it can be; int8's input and output in bf16): medians of alternated
    calls, on `SPEEDUP_PROBE_SHAPE`, once per process; 0 where oneDNN's int8 ops fail. `--dtype auto` reads it
    to tell whether int8 may outrun bf16 here (docs/decisions.md)."""
    rows, inner, outer = SPEEDUP_PROBE_SHAPE
    generator = torch.Generator().manual_seed(0)
    linear = nn.Linear(inner, outer)
    inputs = torch.randn(rows, inner, generator=generator).to(torch.bfloat16)
    try:
        int8 = Int8Linear(linear, rows, weight_levels())
        bf16 = nn.Sequential(linear.to(torch.bfloat16))
        pack_dense_layers(bf16, rows)
        int8_seconds, bf16_seconds = alternate_timings(
            functools.partial(int8, inputs), functools.partial(bf16, inputs), runs=SPEEDUP_PROBE_RUNS
        )
    except (AttributeError, RuntimeError, NotImplementedError) as error:
        logger.info("oneDNN int8 matmul is unavailable in this torch (%s)", error)
        return 0.0
    speedup = statistics.median(bf16_seconds) / statistics.median(int8_seconds)
    logger.info("int8's dense layer runs %.2fx bf16's on this CPU", speedup)
    return speedup
