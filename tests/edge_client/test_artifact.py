"""The training artifact on the device: collected once, verified, cached by its SHA-256."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fedprune.edge_client.artifact import ArtifactStore
from fedprune.protocol.chunks import sha256, split
from fedprune.protocol.errors import WireError
from fedprune.protocol.messages import Chunk, Manifest


def manifest_and_chunks(data: bytes) -> tuple[Manifest, list[Chunk]]:
    chunks = list(split(data, max_chunk=1000))
    return Manifest(topic="a", size=len(data), chunks=len(chunks), sha256=sha256(data)), chunks


def test_chunks_are_assembled_verified_and_cached(tmp_path: Path) -> None:
    data = os.urandom(5000)
    manifest, chunks = manifest_and_chunks(data)
    store = ArtifactStore(tmp_path / "cache")
    assert store.get(manifest) is None

    for chunk in reversed(chunks):
        store.on_chunk(chunk)

    assert store.get(manifest) == data
    assert (tmp_path / "cache" / f"{manifest.sha256}.tflite").read_bytes() == data


def test_a_second_process_takes_the_artifact_from_the_cache(tmp_path: Path) -> None:
    data = os.urandom(3000)
    manifest, chunks = manifest_and_chunks(data)
    first = ArtifactStore(tmp_path)
    for chunk in chunks:
        first.on_chunk(chunk)

    assert ArtifactStore(tmp_path).get(manifest) == data


def test_a_corrupt_cached_file_is_not_used(tmp_path: Path) -> None:
    data = os.urandom(3000)
    manifest, _ = manifest_and_chunks(data)
    (tmp_path / f"{manifest.sha256}.tflite").write_bytes(data[:-1] + b"x")

    assert ArtifactStore(tmp_path).get(manifest) is None


def test_a_chunk_with_bad_data_is_refused_and_nothing_is_cached(tmp_path: Path) -> None:
    data = os.urandom(2500)
    _, chunks = manifest_and_chunks(data)
    bad = Chunk(
        index=0,
        count=chunks[0].count,
        size=chunks[0].size,
        sha256=chunks[0].sha256,
        data=b"\0" * len(chunks[0].data),
    )
    store = ArtifactStore(tmp_path)

    with pytest.raises(WireError, match="SHA-256"):
        for chunk in [bad, *chunks[1:]]:
            store.on_chunk(chunk)

    assert list(tmp_path.iterdir()) == []
