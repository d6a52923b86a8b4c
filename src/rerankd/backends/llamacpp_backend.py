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
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from rerankd.backends.base import BackendInfo, BackendOptions, ModelLoadError, RerankBackend
from rerankd.engine.scheduler import DEFAULT_BATCH_TOKENS
from rerankd.formats.gguf_reader import GGUFModelError, read_gguf
from rerankd.formats.tokenizer import TOKENIZER_JSON

logger = logging.getLogger(__name__)

# general.architecture values llama.cpp serves with rank pooling: encoders that read a classification
# head (`cls`, `cls.output`) and take pairs as one sequence. XLM-RoBERTa GGUFs say `bert`.
LLAMACPP_ARCHITECTURES = ("bert", "jina-bert-v2", "modern-bert", "neo-bert")
# llama.cpp's limit on sequences in one context (LLAMA_MAX_SEQ).
MAX_SEQUENCES = 256
PHANTOM_SPACE = "\u2581"
WORDPIECE_PREFIX = "##"


def load_llamacpp_backend(path: Path, options: BackendOptions) -> LlamaCppBackend:
    """Check that the file can be served (architecture, classifier head, tokenizer), then load it."""
    try:
        import llama_cpp
    except ImportError as error:
        raise ModelLoadError(
            f"{path}: the llama.cpp backend needs llama-cpp-python: pip install 'rerankd[llamacpp]'"
        ) from error
    reader = _open(path)
    architecture = _string(reader, gguf.Keys.General.ARCHITECTURE)
    if architecture not in LLAMACPP_ARCHITECTURES:
        raise ModelLoadError(
            f"{path}: general.architecture {architecture!r} is not a reranker llama.cpp serves with rank "
            f"pooling ({', '.join(LLAMACPP_ARCHITECTURES)})"
        )
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    if "cls.weight" not in tensors and "cls.output.weight" not in tensors:
        raise ModelLoadError(
            f"{path}: this {architecture!r} model has no classification head (cls / cls.output tensors): an "
            "embedding model, which llama.cpp's rank pooling cannot score"
        )
    token_types = tensors.get("token_types.weight")
    if token_types is not None and int(token_types.shape[-1]) > 1:
        logger.warning(
            "%s: the model has %d token types but llama.cpp gives every token type 0, so its scores differ "
            "from transformers' for this model",
            path.name,
            int(token_types.shape[-1]),
        )
    tokenizer = gguf_tokenizer(path, reader)
    context_length = int(_value(reader, gguf.Keys.LLM.CONTEXT_LENGTH.format(arch=architecture)) or 512)
    weight_type = Counter(
        tensor.tensor_type.name for tensor in reader.tensors if len(tensor.shape) >= 2
    ).most_common(1)[0][0]
    del reader, tensors, token_types  # release the memory map before llama.cpp maps the file itself
    return LlamaCppBackend(llama_cpp, path, tokenizer, options, context_length, weight_type)


def gguf_tokenizer(path: Path, reader: gguf.GGUFReader) -> Tokenizer:
    """The model's tokenizer: the `tokenizer.json` beside the file when there is one (exact for every
    family, XLM-RoBERTa's `<s> A </s></s> B </s>` included), else rebuilt from a WordPiece (`bert`)
    vocabulary in the metadata.

    llama.cpp stores WordPiece tokens in "phantom space" form (`▁word` starts a word, a bare piece
    continues one, `[X]` is special), which maps back one to one onto BERT's `word` / `##piece` vocabulary;
    normalization is uncased BERT's (lowercase, accents stripped), as llama.cpp's own WPM tokenizer does.
    Other vocabularies (SentencePiece, BPE) cannot be rebuilt exactly from the metadata, so they need the
    sidecar. Token ids come out as llama.cpp's, since both index the same vocabulary.
    """
    sidecar = path.parent / TOKENIZER_JSON
    if sidecar.is_file():
        try:
            tokenizer = Tokenizer.from_file(str(sidecar))
        # tokenizers reports every parse failure as a bare Exception.
        except Exception as error:
            raise ModelLoadError(f"{sidecar}: not a valid tokenizer: {error}") from error
        if tokenizer.post_processor is None:
            raise ModelLoadError(
                f"{sidecar}: has no post-processor, so it cannot build (query, document) pairs"
            )
        tokenizer.no_padding()
        tokenizer.no_truncation()
        return tokenizer
    model = _string(reader, gguf.Keys.Tokenizer.MODEL)
    if model != "bert":
        raise ModelLoadError(
            f"{path}: a {model!r} vocabulary cannot be rebuilt exactly from the GGUF metadata; put the "
            f"model's {TOKENIZER_JSON} next to the file"
        )
    return wordpiece_from_phantom_space(path, reader)


def wordpiece_from_phantom_space(path: Path, reader: gguf.GGUFReader) -> Tokenizer:
    field = reader.get_field(gguf.Keys.Tokenizer.LIST)
    if field is None:
        raise ModelLoadError(f"{path}: no {gguf.Keys.Tokenizer.LIST} and no {TOKENIZER_JSON} beside it")
    vocabulary = [_from_phantom_space(field.contents(index)) for index in range(len(field.data))]
    cls_id = _value(reader, gguf.Keys.Tokenizer.BOS_ID)
    sep_id = _value(reader, gguf.Keys.Tokenizer.SEP_ID)
    unk_id = _value(reader, gguf.Keys.Tokenizer.UNK_ID)
    if any(token_id is None or not 0 <= token_id < len(vocabulary) for token_id in (cls_id, sep_id, unk_id)):
        raise ModelLoadError(
            f"{path}: [CLS] (bos), [SEP] and [UNK] ids {cls_id}, {sep_id}, {unk_id} are not all in the "
            f"{len(vocabulary)}-token vocabulary"
        )
    tokenizer = Tokenizer(
        models.WordPiece(
            {token: index for index, token in enumerate(vocabulary)},
            unk_token=vocabulary[unk_id],
            continuing_subword_prefix=WORDPIECE_PREFIX,
        )
    )
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix=WORDPIECE_PREFIX)
    types = reader.get_field(gguf.Keys.Tokenizer.TOKEN_TYPE)
    special_types = (gguf.TokenType.CONTROL, gguf.TokenType.UNKNOWN)
    special = {vocabulary[token_id] for token_id in (cls_id, sep_id, unk_id)}
    if types is not None:
        special.update(
            token for index, token in enumerate(vocabulary) if types.contents(index) in special_types
        )
    tokenizer.add_special_tokens(sorted(special))
    tokenizer.post_processor = processors.BertProcessing(
        (vocabulary[sep_id], sep_id), (vocabulary[cls_id], cls_id)
    )
    return tokenizer


class LlamaCppBackend(RerankBackend):
    """One llama.cpp model and embedding context with rank pooling: n_batch = n_ubatch = the model's context
    on a CPU, the engine's token budget on a GPU (a non-causal model needs each sequence whole in one
    ubatch), n_seq_max = the pair cap. The engine's batches are decoded in groups that fit."""

    def __init__(
        self,
        llama_cpp: Any,
        path: Path,
        tokenizer: Tokenizer,
        options: BackendOptions,
        context_length: int,
        weight_type: str,
    ) -> None:
        self._llama = llama_cpp
        _route_llama_logs(llama_cpp)
        llama_cpp.llama_backend_init()
        device = _device(llama_cpp, options.device)
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
        self._max_sequences = max(1, min(options.batch_pairs, MAX_SEQUENCES))
        budget = options.batch_tokens or DEFAULT_BATCH_TOKENS.get(
            device.split(":")[0], DEFAULT_BATCH_TOKENS["cpu"]
        )
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
        threads = options.threads or len(os.sched_getaffinity(0))
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

    def relevance_logits(self, input_ids: Sequence[Sequence[int]]) -> list[float]:
        logits: list[float] = []
        for group in _pack(input_ids, self._max_tokens, self._max_sequences):
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


def _device(llama_cpp: Any, requested: str) -> str:
    """`cpu` or `cuda[:N]`: auto takes the GPU when this llama-cpp-python build can offload to one."""
    gpu = bool(llama_cpp.llama_supports_gpu_offload())
    if requested == "auto":
        return "cuda" if gpu else "cpu"
    if requested.startswith("cuda") and not gpu:
        raise ModelLoadError(
            f"--device {requested}: this llama-cpp-python build has no GPU support; reinstall it with "
            'CMAKE_ARGS="-DGGML_CUDA=on" pip install --force-reinstall --no-cache-dir llama-cpp-python'
        )
    return requested


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


def _from_phantom_space(token: str) -> str:
    if token.startswith("[") and token.endswith("]"):
        return token
    if token.startswith(PHANTOM_SPACE):
        return token[len(PHANTOM_SPACE) :]
    return WORDPIECE_PREFIX + token


def _open(path: Path) -> gguf.GGUFReader:
    try:
        return read_gguf(path)
    except GGUFModelError as error:
        raise ModelLoadError(str(error)) from error


def _value(reader: gguf.GGUFReader, key: str) -> Any:
    field = reader.get_field(key)
    return None if field is None else field.contents()


def _string(reader: gguf.GGUFReader, key: str) -> str | None:
    value = _value(reader, key)
    return value if isinstance(value, str) else None
