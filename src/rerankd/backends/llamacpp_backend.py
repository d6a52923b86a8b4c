"""llama.cpp backend: the GGUF rerankers llama.cpp runs (BERT, XLM-RoBERTa, Jina-BERT, ModernBERT, NeoBERT).

The model runs in llama.cpp through `llama-cpp-python`'s C API with rank pooling, which computes the
classifier head (`cls.output(tanh(cls(h_CLS)))`) and hands back its raw logit per sequence; the engine
applies the sigmoid like for every backend. The engine's own token ids are fed to `llama_decode` directly
(the high-level `Llama.embed` takes only text), so tokenization, truncation and chunking stay the engine's.

llama.cpp's API takes no token types: its BERT graph adds type 0 to every token. A model trained with segment
ids (type_vocab_size 2) is therefore fed input embeddings instead of ids, each token's with its type's offset
from type 0 (`formats.gguf_embeddings`), which makes the graph's sum BERT's. What llama.cpp cannot score as
`transformers` does is refused at load, naming what the file lacks: a BERT whose pooler
`convert_hf_to_gguf.py` dropped. A ModernBERT whose converter stored its LayerNorm epsilon under the RMSNorm
key gets it under the key llama.cpp reads.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGUFReader
from tokenizers import Tokenizer

from rerankd.backends.base import BackendInfo, Batch, ModelLoadError, Pair, RerankBackend
from rerankd.formats.gguf_embeddings import SegmentEmbeddings, segment_embeddings
from rerankd.formats.gguf_file import (
    GGUFModelError,
    gguf_architecture,
    metadata_integer,
    metadata_number,
    metadata_string,
    read_gguf,
)
from rerankd.formats.gguf_wordpiece import llamacpp_tokenizer
from rerankd.settings import RuntimeSettings

logger = logging.getLogger(__name__)

# general.architecture values llama.cpp serves with rank pooling: encoders that read a classification
# head (`cls`, `cls.output`) and take pairs as one sequence. XLM-RoBERTa GGUFs say `bert`.
LLAMACPP_ARCHITECTURES = ("bert", "jina-bert-v2", "modern-bert", "neo-bert")
# llama.cpp's limit on sequences in one context (LLAMA_MAX_SEQ).
MAX_SEQUENCES = 256
# What a file that states no training context (`<arch>.context_length`) gets: BERT's.
DEFAULT_CONTEXT_LENGTH = 512
# The safetensors folder a file came from is what serves a model llama.cpp would score wrong.
SERVE_SAFETENSORS = (
    "serve the model's safetensors folder (config.json, model.safetensors, tokenizer) with the torch "
    "backend instead"
)


def _llama_cpp(path: Path) -> Any:
    try:
        import llama_cpp
    except ImportError as error:
        try:
            served = (
                f"general.architecture {gguf_architecture(path)!r} is served by the llama.cpp backend, which"
            )
        except GGUFModelError as unreadable:
            raise ModelLoadError(str(unreadable)) from unreadable
        raise ModelLoadError(
            f"{path}: {served} needs llama-cpp-python: pip install 'rerankd[llamacpp]'"
        ) from error
    return llama_cpp


def resolve_device(requested: str, path: Path) -> str:
    """`cpu` or `cuda[:N]`: auto takes the GPU when this llama-cpp-python build can offload to one."""
    gpu = bool(_llama_cpp(path).llama_supports_gpu_offload())
    if requested == "auto":
        return "cuda" if gpu else "cpu"
    if requested.startswith("cuda") and not gpu:
        raise ModelLoadError(
            f"--device {requested}: this llama-cpp-python build has no GPU support; reinstall it with "
            'CMAKE_ARGS="-DGGML_CUDA=on" pip install --force-reinstall --no-cache-dir llama-cpp-python'
        )
    return requested


@dataclass(frozen=True)
class ServableFile:
    """What serving a GGUF takes beside llama.cpp's own load of it, read from the file first."""

    tokenizer: Tokenizer
    architecture: str
    context_length: int
    weight_type: str
    segments: SegmentEmbeddings | None  # fed instead of ids to a model with token types
    float_overrides: dict[str, float]  # metadata llama.cpp needs under another key than the file's


def load_llamacpp_backend(path: Path, settings: RuntimeSettings) -> LlamaCppBackend:
    """Check that the file can be served (architecture, classifier head, tokenizer), then load it on the
    settings' (resolved) device."""
    llama_cpp = _llama_cpp(path)
    try:
        # Read in a function of its own, so the memory map is released before llama.cpp maps the file itself.
        servable = _servable(path)
    except GGUFModelError as error:
        raise ModelLoadError(str(error)) from error
    return LlamaCppBackend(llama_cpp, path, servable, settings)


def _servable(path: Path) -> ServableFile:
    """What serving the file takes; GGUFModelError when llama.cpp's rank pooling cannot score it as
    `transformers` scores the model it came from."""
    reader = read_gguf(path)
    architecture = metadata_string(path, reader, gguf.Keys.General.ARCHITECTURE)
    if architecture not in LLAMACPP_ARCHITECTURES:
        raise GGUFModelError(
            path,
            f"general.architecture {architecture!r} is not a reranker llama.cpp serves with rank pooling "
            f"({', '.join(LLAMACPP_ARCHITECTURES)})",
        )
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    if "cls.weight" not in tensors and "cls.output.weight" not in tensors:
        raise GGUFModelError(
            path,
            f"this {architecture!r} model has no classification head (cls / cls.output tensors): an "
            "embedding model, which llama.cpp's rank pooling cannot score",
        )
    if architecture == "bert" and "cls.output.weight" in tensors and "cls.weight" not in tensors:
        raise GGUFModelError(
            path,
            "this BERT has a classifier (cls.output) but no pooler (cls): llama.cpp's convert_hf_to_gguf.py "
            "drops BertForSequenceClassification's pooler.dense, which its score needs "
            f"(classifier(tanh(pooler(h_CLS)))), so llama.cpp would score it wrong; {SERVE_SAFETENSORS}",
        )
    context_key = gguf.Keys.LLM.CONTEXT_LENGTH.format(arch=architecture)
    # 0 as well as a missing key means the file states no context.
    context_length = metadata_integer(path, reader, context_key, default=0) or DEFAULT_CONTEXT_LENGTH
    weight_type = Counter(
        tensor.tensor_type.name for tensor in reader.tensors if len(tensor.shape) >= 2
    ).most_common(1)[0][0]
    return ServableFile(
        tokenizer=llamacpp_tokenizer(path, reader),
        architecture=architecture,
        context_length=context_length,
        weight_type=weight_type,
        segments=segment_embeddings(path, reader),
        float_overrides=_layer_norm_epsilon(path, reader, architecture),
    )


def _layer_norm_epsilon(path: Path, reader: GGUFReader, architecture: str) -> dict[str, float]:
    """ModernBERT's epsilon where llama.cpp reads it. Its LayerNorms take `norm_eps`, which
    convert_hf_to_gguf.py stores as `layer_norm_rms_epsilon` (the name it gives every `norm_eps`), while
    llama.cpp's ModernBERT reads `layer_norm_epsilon` and refuses a file without it; the value is the same."""
    if architecture != "modern-bert":
        return {}
    key = gguf.Keys.Attention.LAYERNORM_EPS.format(arch=architecture)
    rms_key = gguf.Keys.Attention.LAYERNORM_RMS_EPS.format(arch=architecture)
    if reader.get_field(key) is not None or reader.get_field(rms_key) is None:
        return {}
    return {key: metadata_number(path, reader, rms_key)}


class LlamaCppBackend(RerankBackend):
    """One llama.cpp model and embedding context with rank pooling: n_batch = n_ubatch = the model's context
    on a CPU, the engine's token budget on a GPU (a non-causal model needs each sequence whole in one
    ubatch), n_seq_max = the pair cap. The engine's batches are decoded in groups that fit."""

    def __init__(self, llama_cpp: Any, path: Path, servable: ServableFile, settings: RuntimeSettings) -> None:
        self._llama = llama_cpp
        _route_llama_logs(llama_cpp)
        llama_cpp.llama_backend_init()
        device = settings.device
        context_length = servable.context_length
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = -1 if device.startswith("cuda") else 0
        if device.startswith("cuda"):
            model_params.split_mode = llama_cpp.LLAMA_SPLIT_MODE_NONE
            model_params.main_gpu = int(device.partition(":")[2] or 0)
        if servable.float_overrides:
            overrides = _float_overrides(llama_cpp, servable.float_overrides)  # alive until the load returns
            model_params.kv_overrides = overrides
        self._model = llama_cpp.llama_model_load_from_file(str(path).encode(), model_params)
        if not self._model:
            raise ModelLoadError(f"{path}: llama.cpp could not load the model (its log above says why)")
        labels = llama_cpp.llama_model_n_cls_out(self._model)
        if labels not in (1, 2):
            self._free_model()
            raise ModelLoadError(f"{path}: the classifier has {labels} labels; a reranker has 1 or 2")
        self._labels = labels
        self._max_sequences = max(1, min(settings.max_batch_pairs, MAX_SEQUENCES))
        budget = settings.batch_tokens
        # llama.cpp attends across the whole ubatch (a mask keeps sequences apart), so its cost grows with
        # the square of the ubatch, not of each pair. On a CPU the smallest ubatch that holds any pair wins:
        # the MiniLM-L6-shaped bench model ran 4.4 long documents/s with 512-token ubatches against 2.5 with
        # 1024, and ~25 passages/s against ~16. A GPU keeps the scheduler's budget: flash attention there.
        self._max_tokens = max(budget, context_length) if device.startswith("cuda") else context_length
        context_params = llama_cpp.llama_context_default_params()
        context_params.embeddings = True
        context_params.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_RANK
        context_params.n_ctx = context_length
        context_params.n_batch = context_params.n_ubatch = self._max_tokens
        context_params.n_seq_max = self._max_sequences
        context_params.kv_unified = True
        threads = settings.threads or len(os.sched_getaffinity(0))
        context_params.n_threads = context_params.n_threads_batch = threads
        context_params.offload_kqv = context_params.op_offload = device.startswith("cuda")
        if not device.startswith("cuda"):
            # CPU flash attention moved logits by up to 6e-3 with the batch a pair shared (measured on the
            # tiny BERT), plain attention by 2e-5; its cost, attention across the whole ubatch, is small
            # next to the projections at real widths. A GPU keeps it: a 16k-token ubatch needs it.
            context_params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self._context = llama_cpp.llama_init_from_model(self._model, context_params)
        if not self._context:
            self._free_model()
            raise ModelLoadError(f"{path}: llama.cpp could not create a rank-pooling context")
        self._segments = servable.segments
        # A batch of input embeddings (llama.cpp then reads no ids) for a model with token types, else of ids.
        width = 0 if self._segments is None else self._segments.width
        self._batch = llama_cpp.llama_batch_init(self._max_tokens, width, 1)
        self._inputs = (
            np.ctypeslib.as_array(self._batch.token, shape=(self._max_tokens,))
            if self._segments is None
            else np.ctypeslib.as_array(self._batch.embd, shape=(self._max_tokens, width))
        )
        self.tokenizer = servable.tokenizer
        self.info = BackendInfo(
            backend="llamacpp",
            family=servable.architecture,
            device=device,
            dtype=servable.weight_type,
            max_length=context_length,
            untrained=False,
        )

    def relevance_logits(self, batch: Batch) -> list[float]:
        logits: list[float] = []
        for group in _pack(batch.pairs, self._max_tokens, self._max_sequences):
            logits.extend(self._decode(group))
        return logits

    def _decode(self, group: Sequence[Pair]) -> list[float]:
        batch = self._batch
        position = 0
        for sequence, pair in enumerate(group):
            for index in range(len(pair)):
                batch.pos[position] = index
                batch.n_seq_id[position] = 1
                batch.seq_id[position][0] = sequence
                batch.logits[position] = 1  # embeddings need every token marked as an output
                position += 1
        ids = [token for pair in group for token in pair.ids]
        if self._segments is None:
            self._inputs[:position] = ids
        else:
            types = [kind for pair in group for kind in pair.token_type_ids]
            self._inputs[:position] = self._segments.rows(ids, types)
        batch.n_tokens = position
        memory = self._llama.llama_get_memory(self._context)
        if memory:
            self._llama.llama_memory_clear(memory, True)
        status = self._llama.llama_decode(self._context, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode failed with status {status}")
        logits = []
        for sequence in range(len(group)):
            scores = self._llama.llama_get_embeddings_seq(self._context, sequence)
            logits.append(float(scores[0]) if self._labels == 1 else float(scores[1] - scores[0]))
        return logits

    def _free_model(self) -> None:
        self._llama.llama_model_free(self._model)
        self._model = None

    def __del__(self) -> None:
        if getattr(self, "_batch", None) is not None:
            self._llama.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "_context", None):
            self._llama.llama_free(self._context)
            self._context = None
        if getattr(self, "_model", None):
            self._free_model()


def _pack(pairs: Sequence[Pair], max_tokens: int, max_sequences: int) -> Iterator[Sequence[Pair]]:
    """Consecutive groups of at most `max_tokens` tokens and `max_sequences` sequences."""
    start, tokens = 0, 0
    for index, pair in enumerate(pairs):
        if index > start and (tokens + len(pair) > max_tokens or index - start >= max_sequences):
            yield pairs[start:index]
            start, tokens = index, 0
        tokens += len(pair)
    if start < len(pairs):
        yield pairs[start:]


def _float_overrides(llama_cpp: Any, values: dict[str, float]) -> Any:
    """llama.cpp's kv_overrides array for float metadata, closed by the empty entry it stops at."""
    overrides = (llama_cpp.llama_model_kv_override * (len(values) + 1))()
    for index, (key, value) in enumerate(values.items()):
        overrides[index].tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_FLOAT
        overrides[index].key = key.encode()
        overrides[index].value.val_f64 = value
    return overrides


_LOG_LEVELS = {3: logging.WARNING, 4: logging.ERROR}  # ggml's WARN and ERROR; the rest is debug chatter
_log_callback: Any = None  # kept alive for as long as llama.cpp may call it


def _route_llama_logs(llama_cpp: Any) -> None:
    """Send llama.cpp's log lines to this module's logger instead of straight to stderr."""
    global _log_callback
    if _log_callback is not None:
        return

    def forward(level: int, text: bytes, _user_data: Any) -> None:
        message = text.decode("utf-8", "replace").rstrip()
        if message:
            logger.log(_LOG_LEVELS.get(level, logging.DEBUG), "llama.cpp: %s", message)

    _log_callback = llama_cpp.llama_log_callback(forward)
    llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
