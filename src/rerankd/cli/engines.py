"""Loading a model in process for the commands that score without a server (rank, validate, eval)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from rerankd.settings import RuntimeSettings

if TYPE_CHECKING:
    from rerankd.engine.engine import RerankEngine
    from rerankd.quality.scorers import Scorer


def load_model(settings: RuntimeSettings, model: str, dtype: str | None = None) -> RerankEngine:
    """`model` loaded with `settings` (in `dtype`, when given, instead of the settings' own)."""
    from rerankd.engine.loader import load_engine

    return load_engine(model, settings if dtype is None else settings.model_copy(update={"dtype": dtype}))


def scorer_for(
    url: str | None, settings: RuntimeSettings, model: str, dtype: str | None = None, label: str | None = None
) -> Callable[[], Scorer]:
    """What scores `model` when called: a running rerankd at `url` (where `model` is a served name), else the
    model loaded in process and named `label` in the report."""
    from rerankd.quality.scorers import EngineScorer, HTTPScorer

    if url:
        return lambda: HTTPScorer(url, model)
    name = label or (f"{model} ({dtype})" if dtype else model)
    return lambda: EngineScorer(name, load_model(settings, model, dtype))
