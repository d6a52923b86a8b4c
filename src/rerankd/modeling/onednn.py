"""Dense layers whose weights are reordered once for oneDNN, on a CPU.

torch's CPU `linear` hands oneDNN (bf16) or MKL (fp32) a plain row-major weight, and oneDNN reorders a bf16
weight into its kernels' blocked layout on every call. Reordering once, when the model is ready to serve (what
inductor's freezing pass does on a CPU), makes the dense layers faster in both dtypes (in fp32 oneDNN's
kernels beat MKL's), with scores within rounding of the plain layers' (docs/decisions.md).

The two ops are torch's own (`torch.ops.mkldnn`, what inductor emits), not public API, so `pack_dense_layers`
first checks on one layer that they exist and give `F.linear`'s result, and otherwise leaves the model as is.

oneDNN builds one kernel per input shape and keeps it in two caches (its own and ideep's, 1,024 entries each
by default). A server meets many batch shapes, and at the defaults those caches keep growing with them.
`bound_kernel_caches` caps them.
"""

from __future__ import annotations

import logging
import os
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

PACKABLE_DTYPES = (torch.float32, torch.bfloat16)

# Entries of oneDNN's primitive cache, and of ideep's cache of computations (torch's oneDNN wrapper). oneDNN's
# holds a request's passes' kernels (about 130 for base's seven passes of 64 passages), so that they hit on
# its repeat: at 128 each was evicted before its next use. ideep's stays at 128: at 256 too, long documents
# ran 15% slower (docs/decisions.md). Memory stays flat at these sizes.
KERNEL_CACHE_ENTRIES = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": 256, "LRU_CACHE_CAPACITY": 128}


def bound_kernel_caches() -> None:
    """Cap oneDNN's kernel caches, unless the user set them. Both are sized when the first kernel is built, so
    this must run before the process's first oneDNN op."""
    for variable, entries in KERNEL_CACHE_ENTRIES.items():
        os.environ.setdefault(variable, str(entries))


class PackedLinear(nn.Module):
    """`nn.Linear` with its weight in oneDNN's blocked layout, computed by oneDNN's matmul."""

    def __init__(self, linear: nn.Linear, batch_rows: int) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # The layout is chosen for `batch_rows` rows (the engine's padded-token budget); any count runs.
        self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(linear.weight, batch_rows))
        self.register_buffer("bias", linear.bias)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(inputs, self.weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN blocked weight"


def pack_dense_layers(model: nn.Module, batch_rows: int) -> bool:
    """Swap every `nn.Linear` of a CPU `model` in float32 or bfloat16 for a `PackedLinear`, one at a time (the
    plain weight is freed as its packed copy takes its place). False, with the model unchanged, where oneDNN
    cannot: another device or dtype, or a torch whose ops are missing or disagree with `F.linear`."""
    # Names, not modules: each plain layer is dropped as soon as its packed copy replaces it.
    names = [name for name, module in model.named_modules() if type(module) is nn.Linear]
    if not names or not _packs(cast(nn.Linear, model.get_submodule(names[0])), batch_rows):
        return False
    for name in names:
        parent_name, _, attribute = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attribute, PackedLinear(getattr(parent, attribute), batch_rows))
    return True


def _packs(linear: nn.Linear, batch_rows: int) -> bool:
    weight = linear.weight
    if weight.device.type != "cpu" or weight.dtype not in PACKABLE_DTYPES:
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    probe = torch.linspace(-1, 1, 3 * linear.in_features, dtype=weight.dtype).view(3, -1)
    try:
        if weight.dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
        with torch.inference_mode():
            packed = PackedLinear(linear, batch_rows)(probe)
            plain = F.linear(probe, weight, linear.bias)
    except (AttributeError, RuntimeError, NotImplementedError) as error:
        logger.info("oneDNN weight packing is unavailable in this torch (%s); dense layers stay plain", error)
        return False
    return torch.allclose(packed.float(), plain.float(), rtol=1e-2, atol=1e-2)
