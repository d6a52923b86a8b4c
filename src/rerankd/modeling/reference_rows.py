"""A word-embedding table in a serving dtype, with exact float32 copies of the rows some known inputs use.

`--dtype auto` scores the model card's cases in float32 before it keeps bf16 (CPU) or fp16 (CUDA). The word
embeddings are more than half of base's weights (128,100 x 768), and those cases use a few hundred of their
rows. Holding only those rows in float32, with the whole table loaded straight in the serving dtype, keeps the
float32 model out of memory: on base in bf16, the load then peaks near the bf16 model instead of the float32
one. The float32 pass reads exactly the values a float32 table holds, and a token without a row is refused, so
that pass computes what the float32 model would.
"""

from __future__ import annotations

import torch
from torch import nn


class Float32Rows(nn.Module):
    """Embeds with float32 copies of `token_ids`' rows of `serving`'s table; `serving` serves afterwards."""

    slot_of: torch.Tensor  # buffers
    rows: torch.Tensor

    def __init__(self, serving: nn.Embedding, token_ids: torch.Tensor, rows: torch.Tensor) -> None:
        super().__init__()
        self.serving = serving
        slot_of = torch.full((serving.num_embeddings,), -1, dtype=torch.long, device=rows.device)
        slot_of[token_ids] = torch.arange(len(token_ids), device=rows.device)
        self.register_buffer("slot_of", slot_of)
        self.register_buffer("rows", rows.float())

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        slots = self.slot_of[input_ids]
        if bool((slots < 0).any()):
            missing = input_ids[slots < 0].unique()[:8].tolist()
            raise ValueError(f"token ids {missing} have no float32 row: only the reference inputs' tokens do")
        return self.rows[slots]
