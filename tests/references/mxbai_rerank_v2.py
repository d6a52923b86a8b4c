"""Mixedbread's own `mxbai-rerank` package scoring pairs, run in its own environment (it needs transformers
4.x: its tokenizer call `prepare_for_model` is gone from transformers 5). Reads a JSON request on stdin,
writes the token ids and float64 logits it scores to stdout.

Request: {"model": folder, "query": str, "documents": [str], "instruction": str | null}.
"""

import json
import sys

import torch
from mxbai_rerank import MxbaiRerankV2


def main() -> None:
    request = json.load(sys.stdin)
    reranker = MxbaiRerankV2(request["model"], device="cpu", torch_dtype=torch.float64)
    queries = [request["query"]] * len(request["documents"])
    inputs = reranker.prepare_inputs(queries, request["documents"], instruction=request["instruction"])
    ids = [
        row[mask.bool()].tolist()
        for row, mask in zip(inputs["input_ids"], inputs["attention_mask"], strict=True)
    ]
    with torch.inference_mode():
        logits = reranker.predict(queries, request["documents"], instruction=request["instruction"])
    json.dump({"ids": ids, "logits": logits.double().tolist()}, sys.stdout)


if __name__ == "__main__":
    main()
