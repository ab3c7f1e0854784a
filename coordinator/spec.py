"""The Spec every device needs once per model (its architecture and how to train it) and the
training artifact ``litert`` devices train with, published retained.

The artifact is built when the run starts and again after a unit-pruned model is rebuilt, so that
a model litert devices cannot train is known (and said, in the log and in the Spec) before any of
them waits for it. It goes in chunks that every catalogue profile takes, so that it need not be
sent again when a Pi Zero joins; a device that takes smaller ones gets it again in those.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from fedprune.coordinator.config import RunConfig
from fedprune.coordinator.downlink import Downlink
from fedprune.coordinator.fleet import Fleet, smallest_catalogue_payload
from fedprune.protocol.codec import Codec
from fedprune.protocol.errors import FedpruneError
from fedprune.protocol.messages import Manifest, Spec, architecture

if TYPE_CHECKING:
    from fedprune.coordinator.global_model import GlobalModel

log = logging.getLogger("fedprune.coordinator")


class SpecPublisher:
    """Publishes the Spec of ``model`` and its training artifact (built by ``build_artifact``;
    ``None``: this coordinator builds none, and litert devices cannot train)."""

    def __init__(
        self,
        config: RunConfig,
        model: GlobalModel,
        *,
        downlink: Downlink,
        fleet: Fleet,
        codec: Codec | None,
        build_artifact: Callable[[], bytes] | None,
    ) -> None:
        self.config = config
        self.model = model
        self.downlink = downlink
        self.fleet = fleet
        self.codec = codec
        self.build_artifact = build_artifact
        self.artifact = b""  # the training artifact, once built
        self.limit = 0  # the chunk size it went in
        self.architecture = ""  # of the published Spec (protocol.messages.architecture)

    def publish(self) -> None:
        """Build the artifact (anew: the model may have been rebuilt) and publish it with the
        Spec, the artifact in the chunks it went in before, else ones every profile takes."""
        self._build()
        config = self.config
        self._publish(min(config.max_payload, smallest_catalogue_payload(), self.limit or 2**31))

    def joined(self, limit: int) -> None:
        """A device that takes at most ``limit`` bytes a message joined: if the artifact went
        in bigger chunks, publish it again in chunks it takes (and the Spec naming them)."""
        if self.artifact and limit < self.limit:
            self._publish(limit)

    def _publish(self, limit: int) -> None:
        downlink, topics = self.downlink, self.downlink.topics
        manifest = None
        if self.artifact:
            manifest, size = downlink.publish_chunked(
                topics.artifact, self.artifact, limit, receivers=self.fleet.needing_artifact()
            )
            downlink.joining["artifact"], self.limit = size, limit
            log.info(
                "training artifact published: %d bytes in %d chunks", manifest.size, manifest.chunks
            )
        size = downlink.publish(topics.spec, self._spec(manifest), receivers=len(self.fleet))
        downlink.joining["spec"] = size

    def _build(self) -> None:
        """Build the trainable TFLite artifact; when it cannot be, litert devices cannot train
        (``fleet.artifact_error`` says why)."""
        self.fleet.artifact_error, self.artifact = None, b""
        if self.build_artifact is None:
            self.fleet.artifact_error = "this coordinator builds no training artifact"
            return
        try:
            self.artifact = self.build_artifact()
        except FedpruneError as exc:
            self.fleet.artifact_error = str(exc)
            log.warning("litert devices cannot train this model: %s", exc)

    def _spec(self, artifact: Manifest | None) -> Spec:
        config, model_json = self.config, self.model.architecture()
        self.architecture = architecture(model_json)
        return Spec(
            artifact=artifact,
            artifact_error=self.fleet.artifact_error,
            model_json=model_json,
            input_shape=self.model.input_shape(),
            optimizer=config.optimizer,
            learning_rate=config.learning_rate,
            momentum=config.momentum,
            local_epochs=config.local_epochs,
            batch_size=config.batch_size,
            codec=self.codec.name if self.codec else "",
            task=config.task,
            prox_mu=config.prox_mu,
            scaffold=config.scaffold,
        )
