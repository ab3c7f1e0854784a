"""The run's trainable TFLite artifact on the device: sent once, cached by its SHA-256.

The coordinator publishes the artifact's chunks retained and names it in the run's ``Spec``. A
client with the artifact already in its cache (from an earlier run or process) uses that copy
after checking its hash; otherwise it collects the chunks and saves the verified artifact.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fedprune.protocol.chunks import Collector, sha256
from fedprune.protocol.files import write_atomic
from fedprune.protocol.messages import Chunk, Manifest

log = logging.getLogger("fedprune.client")


class ArtifactStore:
    def __init__(self, cache: Path | None) -> None:
        self.cache = cache
        self._collector = Collector()
        self._have: dict[str, bytes] = {}

    def get(self, manifest: Manifest) -> bytes | None:
        """The artifact ``manifest`` names, if it is here (in memory or in the cache)."""
        if manifest.sha256 in self._have:
            return self._have[manifest.sha256]
        path = self._path(manifest.sha256)
        if path is None or not path.is_file():
            return None
        data = path.read_bytes()
        if sha256(data) != manifest.sha256:
            log.warning("ignored a corrupt cached artifact %s", path)
            return None
        log.info("training artifact %s taken from the cache", manifest.sha256[:12])
        self._have = {manifest.sha256: data}
        return data

    def on_chunk(self, chunk: Chunk) -> None:
        payload = self._collector.add(chunk)  # checks size and SHA-256 when complete
        if payload is None:
            return
        self._have = {chunk.sha256: payload}
        path = self._path(chunk.sha256)
        if path is not None:
            try:
                write_atomic(path, payload)
            except OSError as exc:  # the artifact is still used, just not cached
                log.warning("cannot cache the training artifact in %s: %s", path.parent, exc)
        log.info("training artifact %s received (%d bytes)", chunk.sha256[:12], len(payload))

    def _path(self, sha: str) -> Path | None:
        return None if self.cache is None else self.cache / f"{sha}.tflite"
