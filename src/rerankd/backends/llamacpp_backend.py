"""llama.cpp backend: the GGUF rerankers llama.cpp runs (BERT, XLM-RoBERTa, Jina-BERT, ModernBERT, NeoBERT).

The model runs in llama.cpp through `llama-cpp-python`'s C API with rank pooling, which computes the
classifier head (`cls.output(tanh(cls(h_CLS)))`) and hands back its raw logit per sequence; the engine
applies the sigmoid like for every backend. The engine's own token ids are fed to `llama_decode` directly
(the high-level `Llama.embed` takes only text), so tokenization, truncation and chunking stay the engine's.
llama.cpp adds token type 0 to every token, so a BERT trained with segment ids (type_vocab_size 2) scores
differently here than in `transformers`; a warning says so at load.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import gguf
from tokenizers import Tokenizer

from rerankd.backends.base import BackendInfo, Batch, ModelLoadError, RerankBackend
from rerankd.formats.gguf_file import GGUFModelError, metadata_integer, metadata_string, read_gguf
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


def _llama_cpp(path: Path) -> Any:
    try:
        import llama_cpp
    except ImportError as error:
        raise ModelLoadError(
            f"{path}: the llama.cpp backend needs llama-cpp-python: pip install 'rerankd[llamacpp]'"
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


def load_llamacpp_backend(path: Path, settings: RuntimeSettings) -> LlamaCppBackend:
    """Check that the file can be served (architecture, classifier head, tokenizer), then load it on the
    settings' (resolved) device."""
    llama_cpp = _llama_cpp(path)
    try:
        # Read in a function of its own, so the memory map is released before llama.cpp maps the file itself.
        tokenizer, context_length, weight_type = _servable(path)
    except GGUFModelError as error:
        raise ModelLoadError(str(error)) from error
    return LlamaCppBackend(llama_cpp, path, tokenizer, settings, context_length, weight_type)


def _servable(path: Path) -> tuple[Tokenizer, int, str]:
    """The file's tokenizer, context length and weight type; GGUFModelError when llama.cpp's rank pooling
    cannot serve it."""
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
    token_types = tensors.get("token_types.weight")
    if token_types is not None and int(token_types.shape[-1]) > 1:
        logger.warning(
            "%s: the model has %d token types but llama.cpp gives every token type 0, so its scores differ "
            "from transformers' for this model",
            path.name,
            int(token_types.shape[-1]),
        )
    tokenizer = llamacpp_tokenizer(path, reader)
    context_key = gguf.Keys.LLM.CONTEXT_LENGTH.format(arch=architecture)
    # 0 as well as a missing key means the file states no context.
    context_length = metadata_integer(path, reader, context_key, default=0) or DEFAULT_CONTEXT_LENGTH
    weight_type = Counter(
        tensor.tensor_type.name for tensor in reader.tensors if len(tensor.shape) >= 2
    ).most_common(1)[0][0]
    return tokenizer, context_length, weight_type


class LlamaCppBackend(RerankBackend):
    """One llama.cpp model and embedding context with rank pooling: n_batch = n_ubatch = the model's context
    on a CPU, the engine's token budget on a GPU (a non-causal model needs each sequence whole in one
    ubatch), n_seq_max = the pair cap. The engine's batches are decoded in groups that fit."""

    def __init__(
        self,
        llama_cpp: Any,
        path: Path,
        tokenizer: Tokenizer,
        settings: RuntimeSettings,
        context_length: int,
        weight_type: str,
    ) -> None:
        self._llama = llama_cpp
        _route_llama_logs(llama_cpp)
        llama_cpp.llama_backend_init()
        device = settings.device
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = -1 if device.startswith("cuda") else 0
        if device.startswith("cuda"):
            model_params.split_mode = llama_cpp.LLAMA_SPLIT_MODE_NONE
            model_params.main_gpu = int(device.partition(":")[2] or 0)
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
        self._batch = llama_cpp.llama_batch_init(self._max_tokens, 0, 1)
        self.tokenizer = tokenizer
        self.info = BackendInfo(
            backend="llamacpp", device=device, dtype=weight_type, max_length=context_length, untrained=False
        )

    def relevance_logits(self, batch: Batch) -> list[float]:
        logits: list[float] = []
        for group in _pack(batch.input_ids, self._max_tokens, self._max_sequences):
            logits.extend(self._decode(group))
        return logits

    def _decode(self, group: Sequence[Sequence[int]]) -> list[float]:
        batch = self._batch
        position = 0
        for sequence, ids in enumerate(group):
            for index, token in enumerate(ids):
                batch.token[position] = token
                batch.pos[position] = index
                batch.n_seq_id[position] = 1
                batch.seq_id[position][0] = sequence
                batch.logits[position] = 1  # embeddings need every token marked as an output
                position += 1
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


def _pack(
    input_ids: Sequence[Sequence[int]], max_tokens: int, max_sequences: int
) -> Iterator[Sequence[Sequence[int]]]:
    """Consecutive groups of at most `max_tokens` tokens and `max_sequences` sequences."""
    start, tokens = 0, 0
    for index, ids in enumerate(input_ids):
        if index > start and (tokens + len(ids) > max_tokens or index - start >= max_sequences):
            yield input_ids[start:index]
            start, tokens = index, 0
        tokens += len(ids)
    if start < len(input_ids):
        yield input_ids[start:]


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
