"""Large payloads (models, updates, artifacts, deployments) cut into ``Chunk`` messages, and put
back together: each chunk carries the whole payload's size, chunk count and SHA-256, so a receiver
checks what it assembles and tells payloads apart by their hash.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

from fedprune.protocol.errors import OversizeError, WireError
from fedprune.protocol.messages import Chunk

ENVELOPE_ROOM = 512
"""Bytes kept free in every publish for the envelope around a chunk's data (and a signature)."""

MAX_ASSEMBLED_BYTES = 256 * 1024 * 1024
"""The largest payload a receiver reassembles from chunks: a model, an artifact, a deployment."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def split_to_fit(payload: bytes, *, max_payload: int) -> Iterator[Chunk]:
    """``payload`` in chunks whose messages, envelope included, fit in ``max_payload`` bytes."""
    return split(payload, max_chunk=max_payload - ENVELOPE_ROOM)


def split(payload: bytes, *, max_chunk: int) -> Iterator[Chunk]:
    """Cut a payload into chunks whose data is at most ``max_chunk`` bytes."""
    if max_chunk < 1:
        raise ValueError(f"max_chunk must be >= 1, got {max_chunk}")
    digest = sha256(payload)
    count = max(1, -(-len(payload) // max_chunk))
    for index in range(count):
        data = payload[index * max_chunk : (index + 1) * max_chunk]
        yield Chunk(index=index, count=count, size=len(payload), sha256=digest, data=data)


class Reassembler:
    """Collects the chunks of one payload; duplicates (QoS 1 redelivery) are ignored."""

    def __init__(self, *, max_size: int) -> None:
        self.max_size = max_size
        self._parts: dict[int, bytes] = {}
        self._first: Chunk | None = None
        self._bytes = 0

    @property
    def held(self) -> int:
        """Bytes of chunk data held so far."""
        return self._bytes

    def add(self, chunk: Chunk) -> bytes | None:
        """Add a chunk; return the verified payload once complete, else ``None``."""
        first = self._first
        if first is None:
            if chunk.size > self.max_size:
                raise OversizeError(f"payload of {chunk.size} bytes exceeds {self.max_size}")
            if not 0 < chunk.count <= chunk.size + 1:
                raise WireError(f"bad chunk count {chunk.count} for {chunk.size} bytes")
            self._first = first = chunk
        elif (chunk.count, chunk.size, chunk.sha256) != (first.count, first.size, first.sha256):
            raise WireError("chunk does not belong to the payload being assembled")
        if not 0 <= chunk.index < first.count:
            raise WireError(f"chunk index {chunk.index} out of range 0..{first.count - 1}")
        if chunk.index not in self._parts:
            self._bytes += len(chunk.data)
            if self._bytes > first.size:  # never hold more than the declared payload
                raise WireError(f"chunks carry more than the declared {first.size} bytes")
        self._parts.setdefault(chunk.index, chunk.data)
        if len(self._parts) < first.count:
            return None
        payload = b"".join(self._parts[i] for i in range(first.count))
        if len(payload) != first.size or sha256(payload) != first.sha256:
            raise WireError("reassembled payload fails its size or SHA-256 check")
        return payload


class Collector:
    """Reassembles several chunked payloads, told apart by their SHA-256 (a client may see the
    chunks of a new model before the old one is complete). Keeps at most ``keep`` in progress."""

    def __init__(self, *, max_size: int = MAX_ASSEMBLED_BYTES, keep: int = 2) -> None:
        self.max_size = max_size
        self.keep = keep
        self._parts: dict[tuple[str, int], Reassembler] = {}
        self._done: set[str] = set()

    def add(self, chunk: Chunk) -> bytes | None:
        """The payload when ``chunk`` completes it (once per payload), else ``None``. The same
        payload cut into another number of chunks (republished for a smaller message limit) is
        assembled apart."""
        if chunk.sha256 in self._done:
            return None
        key = (chunk.sha256, chunk.count)
        if key not in self._parts and len(self._parts) >= self.keep:
            self._parts.pop(next(iter(self._parts)))  # the oldest, abandoned payload
        parts = self._parts.setdefault(key, Reassembler(max_size=self.max_size))
        try:
            payload = parts.add(chunk)
        except WireError:
            del self._parts[key]
            raise
        if payload is not None:
            del self._parts[key]
            self._done.add(chunk.sha256)
        return payload
