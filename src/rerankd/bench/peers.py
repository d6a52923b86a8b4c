"""The peers rerankd is measured against, each scoring in process the way its users call it:
sentence-transformers' `CrossEncoder.rank` (the encoders), ONNX Runtime and OpenVINO on an ONNX export of
the same model (what a CPU user picks instead), Qwen3-Reranker's model card code, and Mixedbread's own
`mxbai-rerank` package (mxbai-rerank-v2).

Every scorer returns relevance in input order on rerankd's scale (sigmoid of a logit, P("yes")), so the
report can compare their scores with rerankd's. Only the standard library is imported at the top: the
mxbai-rerank peer runs in that package's own virtual environment (it needs transformers 4.x), where rerankd's
dependencies are not installed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

Scorer = Callable[[str, list[str]], list[float]]


def _in_input_order(ranked: Iterable[tuple[int, float]], count: int) -> list[float]:
    """A ranking's (document index, score) pairs as the scores of the documents in input order."""
    scores = [0.0] * count
    for index, score in ranked:
        scores[index] = score
    return scores


def crossencoder(folder: str, dtype: str, device: str) -> Scorer:
    """sentence-transformers' CrossEncoder, its default activation (sigmoid for one label) included."""
    import torch
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(folder, device=device, model_kwargs={"dtype": getattr(torch, dtype)})

    def score(query: str, documents: list[str]) -> list[float]:
        ranked = model.rank(query, documents)
        return _in_input_order(
            ((entry["corpus_id"], float(entry["score"])) for entry in ranked), len(documents)
        )

    return score


# Pairs per call of an ONNX graph: CrossEncoder's default batch size, which users of the runtimes copy.
GRAPH_BATCH = 32
# A tokenizer that states no limit (`model_max_length` is then a huge sentinel) truncates to BERT's.
DEFAULT_MAX_LENGTH = 512


def _graph_scorer(folder: str, run: Callable[[dict[str, Any]], Any], inputs: list[str]) -> Scorer:
    """A graph called as optimum's and the runtimes' examples call one: the `transformers` tokenizer's pairs
    (longest-first truncation, padded per batch of GRAPH_BATCH), the logit's sigmoid."""
    import numpy as np
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    limit = tokenizer.model_max_length if tokenizer.model_max_length < 1_000_000 else DEFAULT_MAX_LENGTH

    def score(query: str, documents: list[str]) -> list[float]:
        scores: list[float] = []
        for start in range(0, len(documents), GRAPH_BATCH):
            batch = documents[start : start + GRAPH_BATCH]
            encoded = tokenizer(
                [query] * len(batch),
                batch,
                padding=True,
                truncation=True,
                max_length=limit,
                return_tensors="np",
            )
            feeds = {name: np.asarray(encoded[name], dtype=np.int64) for name in inputs}
            logits = np.asarray(run(feeds), dtype=np.float64)
            scores += (1 / (1 + np.exp(-logits[:, 0]))).tolist()
        return scores

    return score


def onnx_graph_path(folder: str, dtype: str) -> str:
    """The folder's ONNX export in `dtype` (float32, or a variant such as int8), as `rerankd export --format
    onnx` writes it."""
    from pathlib import Path

    from rerankd.formats.onnx_graph import find_onnx_file

    graph = find_onnx_file(Path(folder), None if dtype == "float32" else dtype)
    if graph is None:
        raise FileNotFoundError(f"{folder}: no {dtype} ONNX graph: rerankd export --format onnx writes it")
    return str(graph)


def onnxruntime_graph(folder: str, dtype: str, device: str) -> Scorer:
    """ONNX Runtime's session on the float32 or dynamic int8 export (every thread of the machine, its
    default), on the CPU or CUDA execution provider."""
    import onnxruntime

    providers = ["CUDAExecutionProvider"] if device == "cuda" else []
    session = onnxruntime.InferenceSession(
        onnx_graph_path(folder, dtype), providers=[*providers, "CPUExecutionProvider"]
    )
    inputs = [value.name for value in session.get_inputs()]
    return _graph_scorer(folder, lambda feeds: session.run(None, feeds)[0], inputs)


def openvino_graph(folder: str, dtype: str, device: str) -> Scorer:
    """OpenVINO's CPU plugin on the float32 export, at the precision named (bf16 is its default on CPUs with
    bf16 units, f32 elsewhere)."""
    import openvino

    precisions = {"float32": "f32", "bfloat16": "bf16"}
    compiled = openvino.Core().compile_model(
        onnx_graph_path(folder, "float32"), "CPU", {"INFERENCE_PRECISION_HINT": precisions[dtype]}
    )
    request = compiled.create_infer_request()
    inputs = [port.get_any_name() for port in compiled.inputs]
    return _graph_scorer(folder, lambda feeds: request.infer(feeds)[compiled.output(0)], inputs)


class Qwen3Card:
    """Qwen3-Reranker as its model card scores it: `transformers`' causal LM, left padding, the card's system
    prompt and instruction, and P("yes") from the last token's logits over "yes" and "no"."""

    MAX_LENGTH = 8192

    def __init__(self, folder: str, dtype: Any, device: str = "cpu") -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from rerankd.modeling.causal import QWEN3_ASSISTANT, QWEN3_DEFAULT_INSTRUCTION, QWEN3_SYSTEM

        self.tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
        model: torch.nn.Module = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.yes = self.tokenizer.convert_tokens_to_ids("yes")
        self.no = self.tokenizer.convert_tokens_to_ids("no")
        self.prefix = self.tokenizer.encode(QWEN3_SYSTEM, add_special_tokens=False)
        self.suffix = self.tokenizer.encode(QWEN3_ASSISTANT, add_special_tokens=False)
        self.default_instruction = QWEN3_DEFAULT_INSTRUCTION

    def encode(self, query: str, documents: list[str], instruction: str | None = None) -> list[list[int]]:
        """The token ids of each pair, prompt included."""
        task = self.default_instruction if instruction is None else instruction
        texts = [f"<Instruct>: {task}\n<Query>: {query}\n<Document>: {document}" for document in documents]
        inputs = self.tokenizer(
            texts,
            padding=False,
            truncation="longest_first",
            return_attention_mask=False,
            max_length=self.MAX_LENGTH - len(self.prefix) - len(self.suffix),
        )
        return [self.prefix + ids + self.suffix for ids in inputs["input_ids"]]

    def score(self, query: str, documents: list[str], instruction: str | None = None) -> Any:
        """P("yes") of each pair, as a tensor in the model's dtype."""
        import torch

        batch = self.tokenizer.pad(
            {"input_ids": self.encode(query, documents, instruction)}, padding=True, return_tensors="pt"
        ).to(self.device)
        with torch.no_grad():
            logits = self.model(**batch).logits[:, -1, :]
        answers = torch.stack([logits[:, self.no], logits[:, self.yes]], dim=1)
        return answers.log_softmax(dim=1)[:, 1].exp()


def qwen3_card(folder: str, dtype: str, device: str) -> Scorer:
    import torch

    card = Qwen3Card(folder, getattr(torch, dtype), device)
    return lambda query, documents: card.score(query, documents).tolist()


def mxbai_rerank(folder: str, dtype: str, device: str) -> Scorer:
    """`mxbai_rerank.MxbaiRerankV2.rank` (its default batch of 32); it returns logits, relevance is their
    sigmoid."""
    import torch
    from mxbai_rerank import MxbaiRerankV2

    model = MxbaiRerankV2(folder, device=device, torch_dtype=getattr(torch, dtype))

    def score(query: str, documents: list[str]) -> list[float]:
        ranked = model.rank(query, documents, top_k=len(documents), return_documents=False)
        relevance = ((entry.index, 1 / (1 + math.exp(-entry.score))) for entry in ranked)
        return _in_input_order(relevance, len(documents))

    return score


SCORERS: dict[str, Callable[[str, str, str], Scorer]] = {
    "sentence-transformers": crossencoder,
    "onnxruntime": onnxruntime_graph,
    "openvino": openvino_graph,
    "qwen3-card": qwen3_card,
    "mxbai-rerank": mxbai_rerank,
}
