"""The one interface every backend implements: a batch of pairs in, one relevance logit per pair out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import chain

from tokenizers import Tokenizer

from rerankd.modeling.causal import Prompt

# Seconds a forward pass of (pairs, longest pair in tokens) takes on the device, as the backend measured it.
PassSeconds = Callable[[int, int], float]

# Called by a running pass after each step of its layers, on the forward thread: there the scheduler may run
# a short request's whole pass before the long one goes on (scheduler.py).
BetweenSteps = Callable[[], None]


class ModelLoadError(Exception):
    """A model could not be loaded; the message names the model and the problem (shown to the user as is)."""


@dataclass(frozen=True)
class BackendInfo:
    backend: str  # registry name, e.g. "torch"
    family: str  # the network's architecture family, e.g. "deberta-v2", "bert", "xlm-roberta"
    device: str
    dtype: str
    max_length: int  # longest pair (in tokens) the network accepts
    untrained: bool  # random weights: scores mean nothing


@dataclass(frozen=True, slots=True)
class Pair:
    """One model input: a (query, document) pair's token ids, special tokens included, and where its second
    segment starts (token type 1 from there on, for models trained with segment ids, such as BERT; the
    pair's length when its template gives every token type 0)."""

    ids: list[int]
    second_segment: int

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def token_type_ids(self) -> list[int]:
        return [0] * self.second_segment + [1] * (len(self.ids) - self.second_segment)


@dataclass(frozen=True)
class Batch:
    """The pairs of one forward pass, unpadded; their logits come back in this order."""

    pairs: Sequence[Pair]

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def lengths(self) -> list[int]:
        return [len(pair.ids) for pair in self.pairs]

    @property
    def longest(self) -> int:
        return max(len(pair.ids) for pair in self.pairs)

    @property
    def input_ids(self) -> list[list[int]]:
        return [pair.ids for pair in self.pairs]

    def flat_ids(self) -> chain[int]:
        """Every pair's ids, one after another."""
        return chain.from_iterable(pair.ids for pair in self.pairs)


class PendingLogits(ABC):
    """A batch's logits: on the host already (`ready`), or still being computed by an asynchronous device,
    in which case `result` waits for them."""

    ready: bool

    @abstractmethod
    def result(self) -> list[float]:
        """The logits, in the batch's order (waits for the device when not `ready`)."""


class ReadyLogits(PendingLogits):
    ready = True

    def __init__(self, logits: list[float]) -> None:
        self._logits = logits

    def result(self) -> list[float]:
        return self._logits


class RerankBackend(ABC):
    """A loaded model. `launch` and `relevance_logits` are called from one worker thread at a time."""

    info: BackendInfo
    tokenizer: Tokenizer
    prompt: Prompt | None = None  # an LLM reranker's: the texts its pairs are wrapped in

    @abstractmethod
    def relevance_logits(self, batch: Batch) -> list[float]:
        """Score a batch of pairs; sigmoid of each logit is the relevance."""

    def launch(self, batch: Batch, between_steps: BetweenSteps | None = None) -> PendingLogits:
        """Start scoring a batch. A backend on an asynchronous device (CUDA) returns once the work is queued,
        before the logits exist, so that the host prepares the next batch while the device runs this one;
        the rest compute the logits here. One that computes layer by layer on the host calls
        `between_steps` after each step of each layer (the torch backends on a CPU); the others run the pass
        whole."""
        return ReadyLogits(self.relevance_logits(batch))

    def warm_up(self, batch: Batch) -> None:
        """Run a pass before the first request, so that no client pays for kernel selection, cache fills or
        lazy initialisation. Called on the engine's forward thread, like every pass."""
        self.relevance_logits(batch)

    def health(self) -> str | None:
        """None while the backend can serve; else what is wrong, for `/ready`. Must answer at once, without
        waiting for a running pass."""
        return None

    def faster_dtypes(self) -> tuple[tuple[str, ...], ...]:
        """Lower precisions this hardware may run faster than the current one, for `--dtype auto`: rivals,
        each a precision followed by its fallbacks (tried in order where it drifts)."""
        return ()

    def cast(self, dtype: str) -> None:
        """Convert the loaded weights to `dtype` in place (only called with what `faster_dtypes` offered)."""
        raise NotImplementedError

    def prepare_for_serving(self) -> None:  # noqa: B027 (optional hook)
        """The dtype is final: make the changes a cast could not undo, such as reordering weights for the
        device's kernels (vLLM's `process_weights_after_loading`) or capturing CUDA graphs for the batch
        shapes the settings it was loaded with allow. The engine calls it once, before the first request."""

    def pass_seconds(self) -> PassSeconds | None:
        """How long a pass of each batch shape takes, where the backend has measured it (once prepared): the
        scheduler then runs a batch as the passes that take the least time. None: one padded pass."""
        return None
