"""Receiving the model deployed to this device's profile: fetch, verify, then save.

The coordinator publishes, retained, a ``Deployment`` on ``deploy/<profile>`` and the model's
chunks under ``deploy/<profile>/chunks/``. A new model replaces the saved one only if its SHA-256
matches the manifest and LiteRT loads it and gives one finite score per class for a sample of the
device's own data; otherwise the previous model stays in place and the failure is logged.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedprune.edge_client.litert import open_model, predict
from fedprune.protocol.chunks import Collector
from fedprune.protocol.errors import ModelError, WireError
from fedprune.protocol.files import write_atomic
from fedprune.protocol.messages import Chunk, Deployment

log = logging.getLogger("fedprune.client")


@dataclass(kw_only=True)
class DeployResult:
    sha256: str
    saved: bool
    reason: str = ""


class DeploymentReceiver:
    """Collects one profile's deployment and installs it into ``folder`` when it verifies."""

    def __init__(self, folder: Path, *, sample: np.ndarray) -> None:
        self.folder = folder
        self.sample = sample
        self.expected: Deployment | None = None
        self.results: dict[str, DeployResult] = {}
        self._parts = Collector()
        self._complete: dict[str, bytes] = {}

    @property
    def installed_sha256(self) -> str | None:
        meta = self.folder / "export.json"
        try:
            return str(json.loads(meta.read_text()).get("sha256")) if meta.exists() else None
        except (OSError, ValueError):
            return None

    def on_deployment(self, deployment: Deployment) -> DeployResult | None:
        self.expected = deployment
        return self._maybe_install()

    def on_chunk(self, chunk: Chunk) -> DeployResult | None:
        """Add a chunk (they may come before their manifest); install once both are in."""
        if chunk.sha256 in self.results:
            return None
        try:
            payload = self._parts.add(chunk)
        except WireError as exc:
            return self._done(chunk.sha256, False, str(exc))
        if payload is None:
            return None
        self._complete = {chunk.sha256: payload}
        return self._maybe_install()

    def _maybe_install(self) -> DeployResult | None:
        expected = self.expected
        if expected is None or expected.model.sha256 in self.results:
            return None
        payload = self._complete.get(expected.model.sha256)
        return None if payload is None else self._install(expected, payload)

    def _install(self, deployment: Deployment, model: bytes) -> DeployResult:
        sha = deployment.model.sha256
        try:
            loaded = open_model(model)
            if loaded.fallback is not None:  # an export made before exports ran on XNNPACK
                log.warning("deployment %s runs on %s", sha[:12], loaded.describe())
            scores = predict(loaded.interpreter, self.sample)
        except ModelError as exc:
            return self._done(sha, False, str(exc))
        if scores.ndim != 2 or scores.shape[1] < 2 or not np.all(np.isfinite(scores)):
            return self._done(sha, False, f"the model's output {scores.shape} is not class scores")
        self.folder.mkdir(parents=True, exist_ok=True)
        write_atomic(self.folder / "model.tflite", model)
        write_atomic(self.folder / "export.json", deployment.export_json.encode())
        return self._done(sha, True)

    def _done(self, sha: str, saved: bool, reason: str = "") -> DeployResult:
        result = DeployResult(sha256=sha, saved=saved, reason=reason)
        self.results[sha] = result
        if saved:
            log.info("installed the deployed model %s in %s", sha[:12], self.folder)
        else:
            log.warning("kept the previous model: deployment %s failed (%s)", sha[:12], reason)
        return result

    def settled(self) -> bool:
        """Nothing announced, or the announced model was installed or refused."""
        expected = self.expected
        return (
            expected is None
            or expected.model.sha256 in self.results
            or (expected.model.sha256 == self.installed_sha256)
        )
