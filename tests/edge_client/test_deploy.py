"""Installing a deployed model on the device: verify first, keep the previous one on failure."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fedprune.edge_client.deploy import DeploymentReceiver
from fedprune.protocol.chunks import sha256, split
from fedprune.protocol.messages import Chunk, Deployment, Manifest


def deployment(model: bytes, *, sha: str | None = None) -> tuple[Deployment, list[Chunk]]:
    digest = sha or sha256(model)
    chunks = [
        Chunk(index=c.index, count=c.count, size=c.size, sha256=digest, data=c.data)
        for c in split(model, max_chunk=4096)
    ]
    manifest = Manifest(topic="t", size=len(model), chunks=len(chunks), sha256=digest)
    meta = json.dumps({"sha256": digest, "precision": "float32"})
    message = Deployment(
        profile="p", model=manifest, precision="float32", accuracy=0.9, export_json=meta
    )
    return message, chunks


def receiver(models: Path, folder: Path) -> DeploymentReceiver:
    with np.load(models / "digits.npz") as npz:
        return DeploymentReceiver(folder, sample=npz["x"][:4])


def test_chunks_before_their_manifest_install_the_model(models: Path, tmp_path: Path) -> None:
    model = (models / "int8" / "model.tflite").read_bytes()
    message, chunks = deployment(model)
    target = receiver(models, tmp_path / "dev")

    results = [target.on_chunk(c) for c in chunks[::-1]] + [target.on_deployment(message)]

    assert results[-1] is not None and results[-1].saved
    assert (tmp_path / "dev" / "model.tflite").read_bytes() == model
    assert target.installed_sha256 == sha256(model)
    assert target.settled()


def test_a_model_that_fails_verification_keeps_the_previous_one(
    models: Path, tmp_path: Path
) -> None:
    # Prepare: a good model installed, then garbage with a matching checksum
    good = (models / "float32" / "model.tflite").read_bytes()
    target = receiver(models, tmp_path / "dev")
    message, chunks = deployment(good)
    target.on_deployment(message)
    for chunk in chunks:
        target.on_chunk(chunk)
    garbage = b"not a flatbuffer" * 100

    # Execute
    message, chunks = deployment(garbage)
    target.on_deployment(message)
    results = [target.on_chunk(c) for c in chunks]

    # Assert
    failed = results[-1]
    assert failed is not None and not failed.saved and "LiteRT" in failed.reason
    assert (tmp_path / "dev" / "model.tflite").read_bytes() == good
    assert target.installed_sha256 == sha256(good)
    assert target.settled()


def test_a_checksum_mismatch_is_refused_and_nothing_is_written(
    models: Path, tmp_path: Path
) -> None:
    model = (models / "float32" / "model.tflite").read_bytes()
    message, chunks = deployment(model, sha="0" * 64)
    target = receiver(models, tmp_path / "dev")

    target.on_deployment(message)
    results = [target.on_chunk(c) for c in chunks]

    assert results[-1] is not None and not results[-1].saved
    assert "SHA-256" in results[-1].reason
    assert not (tmp_path / "dev").exists()


def test_nothing_announced_is_settled_and_an_announced_model_is_awaited(
    models: Path, tmp_path: Path
) -> None:
    target = receiver(models, tmp_path / "dev")
    assert target.settled()

    message, _ = deployment((models / "int8" / "model.tflite").read_bytes())
    target.on_deployment(message)

    assert not target.settled()
