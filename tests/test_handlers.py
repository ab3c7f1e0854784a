"""Every handler of network messages survives whatever a stranger can send on an open broker:
well-formed messages of every kind, with any field values, as any sender, for any session, on
any of the run's topics, into a coordinator between rounds and inside one, an aggregator and a
device. Only the decoders' fuzzing (tests/protocol/test_fuzz.py) sees malformed bytes; these get
past them, into the code that acts on messages.
"""

from __future__ import annotations

import dataclasses
import time
import types
import typing
from collections.abc import Callable
from enum import Enum
from typing import Any

import numpy as np
import pytest
from client_harness import CLIENT, SPEC, make_client
from client_harness import TOPICS as DEVICE
from global_model import MaskedModel
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from memory_broker import MemoryBroker, MemoryTransport
from round_harness import RUN, TOPICS, Harness, make_harness, random_delta, update_payload

from fedprune.coordinator.aggregator import ShareAggregator
from fedprune.coordinator.config import RunConfig
from fedprune.edge_client import trainer
from fedprune.edge_client.data import LocalData
from fedprune.protocol.chunks import sha256, split
from fedprune.protocol.codec import Model, encode_model
from fedprune.protocol.envelope import encode
from fedprune.protocol.errors import ConfigError
from fedprune.protocol.messages import KINDS, Manifest, Message, Round
from fedprune.protocol.topics import Topics

EXAMPLES = 150
HANDLERS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

IDS = ["a", "b", "x", "coordinator", CLIENT]
texts = st.sampled_from([*IDS, "", "0", "fedprune/v1/unit/model/1"]) | st.text(max_size=24)
ints = st.integers(-2, 6) | st.integers(-(2**63), 2**63 - 1)
values = st.recursive(
    st.none() | st.booleans() | ints | st.floats() | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


def of_type(hint: Any) -> st.SearchStrategy[Any]:
    """Any value the decoder lets through for a field of type ``hint``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*(of_type(a) for a in args))
    if hint is type(None):
        return st.none()
    if origin is list:
        return st.lists(of_type(args[0]), max_size=4)
    if origin is dict:
        return st.dictionaries(st.text(max_size=10), values, max_size=4)
    if hint is Any:
        return values
    if isinstance(hint, type) and issubclass(hint, Enum):
        return st.sampled_from(list(hint))
    if dataclasses.is_dataclass(hint):
        return record(hint)  # type: ignore[arg-type]
    return {
        str: texts,
        int: ints,
        float: st.floats(),
        bool: st.booleans(),
        bytes: st.binary(max_size=3000),
    }[hint]


def record(cls: type[Any]) -> st.SearchStrategy[Any]:
    hints = typing.get_type_hints(cls)
    fields = {f.name: of_type(hints[f.name]) for f in dataclasses.fields(cls)}
    return st.fixed_dictionaries(fields).map(lambda kwargs: cls(**kwargs))


messages = st.one_of(*(record(cls) for cls in KINDS.values()))


def topics(t: Topics, devices: list[str]) -> st.SearchStrategy[str]:
    """The run's topics a coordinator, an aggregator or a device reads."""
    rounds = st.sampled_from([1, 2, 3, 0, -1])
    return st.one_of(
        st.sampled_from(devices).map(t.client_status),
        st.builds(
            lambda c, r, i: f"{t.update(c, r)}/{i}",
            st.sampled_from(devices),
            rounds,
            st.sampled_from(["0", "1", "failed", "x"]),
        ),
        st.builds(lambda a, r: f"{t.partial(a, r)}/0", st.sampled_from(["agg-1", "x"]), rounds),
        st.sampled_from(["agg-1", "x"]).map(t.tally),
        st.sampled_from([t.status, t.round, t.spec, t.close, t.inbox(CLIENT)]),
        st.builds(lambda v, i: f"{t.model(v)}/{i}", rounds, st.sampled_from([0, 1])),
        st.builds(lambda i: f"{t.deploy('raspberry-pi-4')}/chunks/{i}", st.integers(0, 2)),
        st.just(t.deploy("raspberry-pi-4")),
        st.builds(lambda i: f"{t.artifact}/{i}", st.integers(0, 2)),
    )


def stranger(t: Topics, session: str) -> st.SearchStrategy[tuple[str, bytes]]:
    """(topic, payload) on run ``t``'s topics: a message of any kind, as any sender, for this
    run or another, for this session or another."""
    return st.tuples(
        topics(t, ["a", "b", "x", CLIENT]),
        messages,
        st.sampled_from(IDS),
        st.sampled_from([session, "", "0000000000-old", "ffffffffff-new"]),
        st.sampled_from([t.run, "another-run"]),
    ).map(lambda t: (t[0], encode(t[1], run=t[4], sender=t[2], session=t[3])))


@pytest.fixture(scope="module")
def harness() -> Any:
    return make_harness()


@HANDLERS
@given(data=st.data())
def test_a_coordinator_survives_any_message_between_rounds_and_inside_one(
    harness: Any, data: st.DataObject
) -> None:
    # Prepare: a coordinator with two honest devices
    h: Harness = harness(round_timeout=0.3)
    session = h.coordinator.telemetry.session
    before = data.draw(st.lists(stranger(TOPICS, session), max_size=4), label="before the round")
    during = data.draw(st.lists(stranger(TOPICS, session), max_size=6), label="during the round")

    def answer(announcement: Round, model: Model) -> None:
        for topic, payload in during:
            h.coordinator.inbox.handle(topic, payload)
        for name, seed in (("a", 1), ("b", 2)):
            h.clients[name].send(
                announcement.round, update_payload(model, random_delta(model, seed))
            )

    h.on_round(answer)

    # Execute: nothing it handles raises; the round still ends
    for topic, payload in before:
        h.coordinator.inbox.handle(topic, payload)
    try:
        _, result, _ = h.run_round()
    except ConfigError as exc:  # every device gone (forged last wills): the run ends cleanly
        assert "online" in str(exc)
        return

    # Assert: the honest devices still count, unless a forged hello or will removed them
    assert result.reported <= 2


SESSION = "0000000001-abc"


def _announced(
    handle: Callable[[str, bytes], None], t: Topics, model: Model, selected: list[str]
) -> None:
    """A genuine round 1 of session SESSION selecting ``selected``: its model's chunks, then the
    announcement, as the coordinator publishes them."""
    payload = encode_model(model)
    chunks = list(split(payload, max_chunk=4096))
    for chunk in chunks:
        handle(f"{t.model(1)}/{chunk.index}", _coordinators(t, chunk))
    manifest = Manifest(
        topic=t.model(1), size=len(payload), chunks=len(chunks), sha256=sha256(payload)
    )
    announcement = Round(
        round=1,
        model_version=1,
        deadline=time.time() + 60,
        duration=60.0,
        model=manifest,
        local_epochs=1,
        session=SESSION,
        selected=selected,
    )
    handle(t.round, _coordinators(t, announcement))


def _coordinators(t: Topics, message: Message) -> bytes:
    return encode(message, run=t.run, sender="coordinator", session=SESSION)


@HANDLERS
@given(data=st.data(), announced=st.booleans())
def test_an_aggregator_survives_any_message(data: st.DataObject, announced: bool) -> None:
    broker = MemoryBroker()
    aggregator = ShareAggregator(
        MemoryTransport(broker), RunConfig(run=RUN), name="agg-1", group="fedprune"
    )
    if announced:  # a round is being collected
        _announced(aggregator.handle, TOPICS, MaskedModel().model(), ["a", "b", "x"])
        assert aggregator.intake.current is not None
    for topic, payload in data.draw(st.lists(stranger(TOPICS, SESSION), max_size=8)):
        aggregator.handle(topic, payload)


MODEL = Model(
    weights=[np.ones((4, 3), np.float32), np.zeros(3, np.float32)],
    masks=[(np.arange(12) % 2).astype(np.float32).reshape(4, 3), None],
)


@HANDLERS
@given(data=st.data(), announced=st.booleans())
def test_a_device_survives_any_message(
    data: st.DataObject, announced: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(trainer.BACKENDS, "fake", "client_harness:AddOneTrainer")
    rng = np.random.default_rng(0)
    local = LocalData(
        x=rng.normal(size=(8, 4)).astype(np.float32),
        y=rng.integers(0, 3, size=8),
        x_test=rng.normal(size=(2, 4)).astype(np.float32),
        y_test=rng.integers(0, 3, size=2),
    )
    broker = MemoryBroker()
    client = make_client(broker, local)
    if announced:  # a round selecting this device is under way
        spec = dataclasses.replace(SPEC, input_shape=[4])
        client.step((DEVICE.spec, _coordinators(DEVICE, spec)))
        _announced(lambda topic, payload: client.step((topic, payload)), DEVICE, MODEL, [CLIENT])
        assert client.stats.rounds == [1]  # it trained and sent its update
    for item in data.draw(st.lists(stranger(DEVICE, SESSION), max_size=8)):
        try:
            client.step(item)
        except ConfigError:  # a Spec this device cannot train: it says so in one line and exits
            return
