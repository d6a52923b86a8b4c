"""`/ready` asks every loaded model's backend whether it can still serve; warm-up runs where passes run."""

from __future__ import annotations

import threading
from pathlib import Path

from fastapi.testclient import TestClient

from rerankd.api.app import create_app
from rerankd.backends.base import Batch, RerankBackend
from rerankd.engine.engine import RerankEngine
from rerankd.engine.models import ServedModels
from rerankd.settings import ServeSettings

from conftest import load_backend_at


class ReportingBackend(RerankBackend):
    """The real backend, reporting a health problem when told to and recording the threads passes run on."""

    def __init__(self, inner: RerankBackend) -> None:
        self._inner = inner
        self.info = inner.info
        self.tokenizer = inner.tokenizer
        self.problem: str | None = None
        self.pass_threads: list[str] = []

    def relevance_logits(self, batch: Batch) -> list[float]:
        self.pass_threads.append(threading.current_thread().name)
        return self._inner.relevance_logits(batch)

    def health(self) -> str | None:
        return self.problem


def test_ready_reports_a_model_whose_backend_is_unhealthy(xsmall_model_dir: Path) -> None:
    backend = ReportingBackend(load_backend_at(xsmall_model_dir, device="cpu"))
    settings = ServeSettings(device="cpu").for_device("cpu")
    engine = RerankEngine("xsmall", backend, settings)
    engine.warm_up()
    assert set(backend.pass_threads) == {"forward-xsmall_0"}  # the engine's forward thread, as every batch
    with TestClient(create_app(ServedModels.of([engine]), settings)) as client:
        assert client.get("/ready").json()["status"] == "ready"
        backend.problem = "cuda:0: an illegal memory access was encountered"
        refused = client.get("/ready")
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert refused.json() == {  # a backend may recover: 503 with Retry-After, not a permanent failure
            "status": "unhealthy",
            "ready": [],
            "pending": [],
            "failed": {"xsmall": f"unhealthy: {backend.problem}"},
        }
        backend.problem = None
        assert client.get("/ready").status_code == 200
