"""What a device builds from the network's model JSON (checked without TensorFlow)."""

from __future__ import annotations

import json

import pytest

from fedprune.edge_client.keras_trainer import check_architecture
from fedprune.protocol.errors import ConfigError


def _sequential(*layers: dict[str, object]) -> str:
    return json.dumps({"class_name": "Sequential", "config": {"name": "m", "layers": list(layers)}})


def _layer(kind: str, name: str, **config: object) -> dict[str, object]:
    return {"class_name": kind, "config": {"name": name, **config}}


def test_plain_layers_pass() -> None:
    check_architecture(
        _sequential(
            _layer("InputLayer", "in"),
            _layer("Conv2D", "conv", activation="relu"),
            _layer("BatchNormalization", "bn"),
            _layer("Flatten", "flat"),
            _layer("Dense", "out", activation="softmax"),
        )
    )


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            _sequential(_layer("Lambda", "evil", function=["4wEAAAAA", None, None])),
            "layer 'evil' of class 'Lambda', which devices do not build from the network",
        ),
        (
            _sequential(
                {
                    "class_name": "Functional",
                    "config": {"name": "inner", "layers": [_layer("MyCustomLayer", "custom")]},
                }
            ),
            "layer 'custom' of class 'MyCustomLayer'",
        ),
        (
            _sequential(_layer("Dense", "d", activation={"class_name": "custom_fn"})),
            "an activation .*custom_fn.* that devices do not build",
        ),
        ("not json", "the run's model architecture is not JSON"),
        ('["a list"]', "not a Keras model config"),
    ],
    ids=["lambda", "nested-custom", "custom-activation", "not-json", "not-a-config"],
)
def test_code_or_custom_classes_in_the_architecture_are_refused(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_architecture(spec)
