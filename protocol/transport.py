"""The network behind a small interface. This is the only module that imports paho-mqtt.

Incoming messages are put on a queue that the owner drains from its own thread: nothing runs inside
paho's callbacks except that, which avoids paho's publish-from-callback deadlocks. The queue is
bounded: a burst the reader cannot keep up with waits at the broker (TCP back-pressure), not in
this process's memory. But paho's network thread, which makes the put, must never wait long: it
also sends keepalives and acknowledgements, and a broker drops a client it has not heard from in
1.5 keepalives. So a put waits for room in slices of a quarter keepalive, and after each it takes
the message anyway and lets paho's loop go round (the queue grows by one message a slice while
the reader is stuck).

A *persistent* transport (the coordinator's, an aggregator's) keeps its MQTT session on the broker
across reconnects: what is published for it while its connection is down (a stalled process, a
network cut) is queued there and delivered when it is back. Each process starts a fresh session
and ends it at :meth:`~MqttTransport.close`, so nothing of an earlier process is delivered to a
new one. On every reconnect this side's retained messages are published again (the broker may have
restarted without them, or replaced one with our last will), and the subscriptions renewed unless
the broker kept them. A lost or restored connection is logged as a warning and kept as a
:class:`ConnectionEvent` for the owner (:meth:`Transport.connection_events`).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import queue
import ssl
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fedprune.protocol.connection import BrokerSettings, BrokerUrl
from fedprune.protocol.errors import BrokerError, OversizeError

__all__ = [
    "BrokerSettings",
    "BrokerUrl",
    "ConnectionChange",
    "ConnectionEvent",
    "Incoming",
    "MqttTransport",
    "Transport",
    "topic_matches",
]

Incoming = tuple[str, bytes]

log = logging.getLogger("fedprune.transport")

KEEPALIVE = 30
"""Seconds between keepalives; a broker drops a client it has not heard from in 1.5 times that."""

SESSION_EXPIRY = 3600
"""Over MQTT 5, seconds a persistent transport's session outlives a lost connection (MQTT 3.1.1
sessions last until the broker's ``persistent_client_expiration``)."""

INBOX_BYTES = 64 * 1024 * 1024
"""What an MQTT transport holds of received payloads before it stops reading from the broker."""


class ConnectionChange(StrEnum):
    LOST = "lost"
    RESTORED = "restored"


@dataclass(frozen=True, kw_only=True)
class ConnectionEvent:
    """The connection to the broker was lost or restored: what the owner logs, counts and shows.
    ``waiting`` messages had been received and not yet taken, ``unacknowledged`` publishes not yet
    acknowledged; on restore, ``session_kept`` says whether what was published for us meanwhile
    (QoS 1) is still coming, and ``down`` how many seconds the connection was away."""

    change: ConnectionChange
    detail: str
    waiting: int = 0
    unacknowledged: int = 0
    session_kept: bool = False
    down: float = 0.0


class Inbox:
    """A queue of incoming messages that holds at most ``limit`` payload bytes (0: any): a put
    beyond that waits until the reader has brought it down to half (so that the two threads take
    turns in batches, not message by message), but never longer than ``patience`` seconds at a
    time (then the message goes in anyway). A message alone in the queue is always taken, however
    big.

    The put runs on the MQTT network thread, which also reads acknowledgements: while the reader
    waits for one (:meth:`unbounded`) puts do not wait, and after :meth:`close` they drop."""

    def __init__(self, limit: int = 0, *, patience: float = math.inf) -> None:
        self.limit = limit
        self.patience = patience
        self.overdrawn = 0  # messages taken in over the limit because the reader took too long
        self._items: collections.deque[Incoming] = collections.deque()
        self._held = 0
        self._unbounded = 0  # readers waiting for the network thread
        self._closed = False
        self._changed = threading.Condition()

    def put(self, item: Incoming) -> None:
        with self._changed:
            if self.limit and self._items and self._held + len(item[1]) > self.limit:
                room = self._changed.wait_for(
                    lambda: (
                        self._unbounded
                        or self._closed
                        or not self._items
                        or self._held <= self.limit // 2
                    ),
                    timeout=None if self.patience == math.inf else self.patience,
                )
                self.overdrawn += not room
            if self._closed:
                return
            self._items.append(item)
            self._held += len(item[1])
            self._changed.notify_all()

    def get(self, timeout: float) -> Incoming:
        """The oldest message; ``queue.Empty`` after ``timeout`` seconds without one."""
        with self._changed:
            if not self._changed.wait_for(lambda: self._items, timeout=timeout):
                raise queue.Empty
            item = self._items.popleft()
            self._held -= len(item[1])
            if not self._items or self._held <= self.limit // 2:
                self._changed.notify_all()  # a waiting put may go on
            return item

    def __len__(self) -> int:
        return len(self._items)

    @contextlib.contextmanager
    def unbounded(self) -> Iterator[None]:
        """Puts do not wait while this lasts: the reader waits for the network thread."""
        with self._changed:
            self._unbounded += 1
            self._changed.notify_all()
        try:
            yield
        finally:
            with self._changed:
                self._unbounded -= 1

    def close(self) -> None:
        """Drop what comes from now on, and let a waiting put go (the reader has stopped)."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()


class Transport(ABC):
    """Publish bytes to topics and receive what matches the subscriptions, in order."""

    def __init__(self, *, max_payload: int, inbox: Inbox | None = None) -> None:
        self.max_payload = max_payload
        self.inbox = Inbox() if inbox is None else inbox
        self._events: collections.deque[ConnectionEvent] = collections.deque(maxlen=100)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        """Publish one message; payloads over ``max_payload`` are refused before they are sent."""
        if len(payload) > self.max_payload:
            raise OversizeError(
                f"payload of {len(payload)} bytes on {topic} exceeds the maximum {self.max_payload}"
            )
        self._publish(topic, payload, qos, retain)

    def get(self, timeout: float) -> Incoming | None:
        """Next incoming message, or ``None`` after ``timeout`` seconds."""
        try:
            return self.inbox.get(timeout=timeout)
        except queue.Empty:
            return None

    def connection_events(self) -> list[ConnectionEvent]:
        """The connection's changes since the last call, oldest first."""
        events = []
        while self._events:
            events.append(self._events.popleft())
        return events

    @abstractmethod
    def _publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> None: ...

    @abstractmethod
    def subscribe(self, pattern: str, qos: int = 1, *, retained: bool = True) -> None:
        """Receive what is published on ``pattern`` from now on; with ``retained``, also what
        the broker keeps retained there. Without it, a retained message on those topics is
        dropped and cleared from the broker (nobody should leave one there: a device's update)."""

    @abstractmethod
    def unsubscribe(self, pattern: str) -> None: ...

    def steady_for(self) -> float:
        """Seconds since the connection was last (re)established; 0 while it is down."""
        return math.inf

    @abstractmethod
    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every QoS>0 message published so far is acknowledged; ``False`` if some were
        not within ``timeout`` (paho still holds them and sends them after a reconnect)."""

    @abstractmethod
    def close(self) -> None: ...


class MqttTransport(Transport):
    """paho-mqtt 2.x client with a last will, TLS and credentials, reconnect with backoff, and
    resubscription. The MQTT client id is ``client_id`` itself, so that broker ACLs can name it.
    ``persistent`` keeps the session on the broker across reconnects (see the module's text)."""

    def __init__(
        self,
        broker: str | BrokerUrl | BrokerSettings,
        *,
        client_id: str,
        will: tuple[str, bytes] | None = None,
        max_payload: int = 256 * 1024,
        connect_attempts: int = 5,
        persistent: bool = False,
        keepalive: int = KEEPALIVE,
        inbox_bytes: int = INBOX_BYTES,
    ) -> None:
        """``inbox_bytes`` bounds what is received and not yet taken (:class:`Inbox`)."""
        super().__init__(max_payload=max_payload, inbox=Inbox(inbox_bytes, patience=keepalive / 4))
        if isinstance(broker, str):
            broker = BrokerUrl.parse(broker)
        self.settings = broker if isinstance(broker, BrokerSettings) else BrokerSettings(url=broker)
        self.url = self.settings.url
        self.client_id = client_id
        self.persistent = persistent
        self.keepalive = keepalive
        self._subscriptions: dict[str, int] = {}
        self._fresh_only: set[str] = set()  # patterns whose retained messages are not wanted
        self.stale_retained = 0  # retained messages dropped (and cleared) on those
        self._unconfirmed: set[str] = set()  # subscribed or unsubscribed while disconnected
        self._connected = threading.Event()
        self._closing = False
        self._refused: str | None = None  # why the broker turned us away, before it accepted us
        self._pending: list[mqtt.MQTTMessageInfo] = []  # QoS 1 publishes maybe not yet acked
        self._prune_at = 64  # forget the acknowledged ones when there are this many
        self._lock = threading.Lock()
        self._retained: dict[str, bytes] = {}
        self._subacks: dict[int, threading.Event] = {}
        self._connection = 0  # counts connections (the first is not a reconnect)
        self._up_since = -math.inf  # when the connection came back (monotonic); inf while down
        self._down_since = math.inf  # when it was lost (monotonic)
        self._client = self._paho(client_id, clean=not persistent)
        if will is not None:
            self._client.will_set(will[0], will[1], qos=1, retain=True)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe
        if persistent and not self.url.mqtt5:
            self._end_session()  # MQTT 3.1.1 cannot start clean and then keep the session
        self._connect(connect_attempts)

    def _paho(self, client_id: str, *, clean: bool) -> mqtt.Client:
        """A paho client for this broker (TLS, credentials, backoff); ``clean`` over MQTT 3.1.1
        says whether the broker forgets the session when the connection ends."""
        v5 = self.url.mqtt5
        protocol = MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=protocol,
            clean_session=None if v5 else clean,
        )
        client.reconnect_delay_set(min_delay=1, max_delay=8)
        settings = self.settings
        if settings.url.tls:
            try:
                client.tls_set(
                    ca_certs=None if settings.ca is None else str(settings.ca),
                    certfile=None if settings.cert is None else str(settings.cert),
                    keyfile=None if settings.key is None else str(settings.key),
                    cert_reqs=ssl.CERT_REQUIRED,
                )
            except (ssl.SSLError, OSError) as exc:
                raise BrokerError(f"cannot use the TLS files for {self.url}: {exc}") from exc
        if settings.username is not None:
            client.username_pw_set(settings.username, settings.password)
        return client

    def _connect_properties(self) -> Properties | None:
        """MQTT 5: how long the broker keeps our session."""
        if not self.url.mqtt5:
            return None
        expiry = SESSION_EXPIRY if self.persistent else 0
        return _properties(PacketTypes.CONNECT, SessionExpiryInterval=expiry)

    def _end_session(self, timeout: float = 5.0) -> None:
        """Make the broker forget this client id's session (what an earlier process left queued):
        connect once with a clean session, then disconnect. Best effort: an unreachable broker
        is said by the real connection."""
        client = self._paho(self.client_id, clean=True)
        done = threading.Event()
        client.on_connect = lambda *_args: done.set()
        try:
            client.connect(self.url.host, self.url.port, keepalive=self.keepalive)
            client.loop_start()
            done.wait(timeout)
            client.disconnect()
            client.loop_stop()
        except (OSError, ssl.SSLError) as exc:
            log.debug("could not clear the broker's session of %s: %s", self.client_id, exc)

    def _connect(self, attempts: int) -> None:
        delay = 0.5
        log.info("connecting to the MQTT broker at %s", self.url)
        for attempt in range(1, attempts + 1):
            try:
                self._client.connect(
                    self.url.host,
                    self.url.port,
                    keepalive=self.keepalive,
                    properties=self._connect_properties(),
                )
                break
            except ssl.SSLError as exc:  # permanent: retrying cannot fix a certificate
                reason = getattr(exc, "verify_message", None) or exc.reason or str(exc)
                raise BrokerError(
                    f"TLS with the MQTT broker at {self.url} failed: {reason} (check --ca, and"
                    " --cert/--key if the broker asks for a client certificate)"
                ) from exc
            except OSError as exc:
                reason = _unreachable(exc, self.url)
                if attempt == attempts:
                    raise BrokerError(
                        f"cannot reach the MQTT broker at {self.url} after {attempts} attempts"
                        f" ({reason})"
                    ) from exc
                log.warning(
                    "the MQTT broker at %s is not reachable (%s); attempt %d of %d, next in %.1f s",
                    self.url,
                    reason,
                    attempt,
                    attempts,
                    delay,
                )
                time.sleep(delay)
                delay = min(delay * 2, 8.0)
        self._client.loop_start()
        deadline = time.monotonic() + 15
        while not self._connected.wait(timeout=0.05):
            if self._refused is not None or time.monotonic() > deadline:
                self._client.loop_stop()
                self._client.disconnect()
                why = self._refused or "no answer within 15 s"
                raise BrokerError(f"the MQTT broker at {self.url} refused the connection: {why}")
        log.info("connected to the MQTT broker at %s", self.url)

    def _on_connect(
        self, client: mqtt.Client, _u: object, flags: mqtt.ConnectFlags, rc: object, _p: object
    ) -> None:
        if getattr(rc, "is_failure", False):
            if not self._connected.is_set():
                self._refused = _refusal(rc, self.settings)
            return
        self._connection += 1
        kept = self.persistent and bool(flags.session_present)
        if self._connection > 1:
            self._restored(kept)
        if self._up_since == math.inf:  # back after a drop (the first connection counts as old)
            self._up_since = time.monotonic()
        # A kept session keeps its subscriptions: subscribing again would only make the broker
        # send every retained message again (a hello per device).
        renew = [p for p in self._subscriptions if not kept or p in self._unconfirmed]
        for pattern in renew:
            client.subscribe(pattern, self._subscriptions[pattern])
        for pattern in self._unconfirmed - set(self._subscriptions):
            client.unsubscribe(pattern)
        self._unconfirmed.clear()
        with self._lock:
            retained = list(self._retained.items())
        for topic, payload in retained:
            client.publish(topic, payload, qos=1, retain=True)
        self._connected.set()

    def _restored(self, kept: bool) -> None:
        down = time.monotonic() - self._down_since if self._down_since < math.inf else 0.0
        self._down_since = math.inf
        if kept or not self.persistent:
            what = "the broker kept this client's session" if kept else "a clean session"
            log.warning(
                "reconnected to the MQTT broker at %s after %.1f s (%s)", self.url, down, what
            )
            detail = f"reconnected after {down:.1f} s ({what})"
        else:
            log.warning(
                "reconnected to the MQTT broker at %s after %.1f s, but the broker did not keep"
                " this client's session: what was published for it meanwhile is lost (a broker"
                " restart without persistence, or a session expiry shorter than the outage)",
                self.url,
                down,
            )
            detail = f"reconnected after {down:.1f} s; the broker lost the session"
        self._events.append(
            ConnectionEvent(
                change=ConnectionChange.RESTORED, detail=detail, session_kept=kept, down=down
            )
        )

    def _on_disconnect(
        self, _c: mqtt.Client, _u: object, _f: object, rc: object, *_p: object
    ) -> None:
        if self._refused is None and not self._connected.is_set():
            hint = (
                "a broker that requires a client certificate does this when none is given"
                " (--cert, --key)"
                if self.url.tls
                else "a TLS listener does this to a plain connection (use mqtts://)"
            )
            self._refused = f"it closed the connection before accepting it; {hint}"
        was_up = self._connected.is_set()
        self._connected.clear()
        self._up_since = math.inf
        if was_up and not self._closing:
            self._lost(str(rc))

    def _lost(self, reason: str) -> None:
        self._down_since = time.monotonic()
        waiting = len(self.inbox)
        with self._lock:
            unacknowledged = sum(1 for info in self._pending if not _settled(info))
        kept = (
            "the broker keeps this client's session: what is published for it meanwhile waits there"
            if self.persistent
            else "what is published for it meanwhile is not kept"
        )
        log.warning(
            "lost the connection to the MQTT broker at %s (%s); %d received message(s) not yet"
            " handled, %d publish(es) not yet acknowledged; %s; reconnecting",
            self.url,
            reason,
            waiting,
            unacknowledged,
            kept,
        )
        self._events.append(
            ConnectionEvent(
                change=ConnectionChange.LOST,
                detail=f"lost the connection ({reason})",
                waiting=waiting,
                unacknowledged=unacknowledged,
            )
        )

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        fresh_only = any(topic_matches(p, msg.topic) for p in self._fresh_only)
        if fresh_only and msg.retain and msg.payload:
            # Clear it: left there, it would come to every later session
            self._client.publish(msg.topic, b"", qos=1, retain=True)
            self.stale_retained += 1
            log.warning("dropped and cleared a retained message on %s", msg.topic)
        if fresh_only and (msg.retain or not msg.payload):
            return  # (an empty one is such a clearing, ours or another's)
        self.inbox.put((msg.topic, bytes(msg.payload)))

    def subscribe(self, pattern: str, qos: int = 1, *, retained: bool = True) -> None:
        """Subscribe and wait (up to 10 s) for the broker's acknowledgement, so that nothing
        published after this returns can be missed (``retained``: :meth:`Transport.subscribe`)."""
        self._subscriptions[pattern] = qos
        if not retained:
            self._fresh_only.add(pattern)
        result, mid = self._client.subscribe(pattern, qos)
        if result != mqtt.MQTT_ERR_SUCCESS or mid is None:
            self._unconfirmed.add(pattern)  # not connected: _on_connect subscribes
            return
        with self._lock:
            acked = self._subacks.setdefault(mid, threading.Event())
        with self.inbox.unbounded():
            acked.wait(10)
        with self._lock:
            self._subacks.pop(mid, None)

    def steady_for(self) -> float:
        return max(0.0, time.monotonic() - self._up_since)

    def unsubscribe(self, pattern: str) -> None:
        """Stop receiving ``pattern`` (what is already queued stays queued)."""
        if self._subscriptions.pop(pattern, None) is not None:
            result, _mid = self._client.unsubscribe(pattern)
            if result != mqtt.MQTT_ERR_SUCCESS:
                self._unconfirmed.add(pattern)  # not connected: _on_connect unsubscribes

    def _on_subscribe(self, _c: mqtt.Client, _u: object, mid: int, *_rest: object) -> None:
        with self._lock:
            self._subacks.setdefault(mid, threading.Event()).set()

    def _publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        if retain:
            with self._lock:
                if payload:
                    self._retained[topic] = payload
                else:
                    self._retained.pop(topic, None)
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if qos > 0:
            with self._lock:
                self._pending.append(info)
                if len(self._pending) >= self._prune_at:  # amortized: thousands may wait
                    self._pending = [i for i in self._pending if not _settled(i)]
                    self._prune_at = max(64, 2 * len(self._pending))

    def flush(self, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        with self._lock:
            pending, self._pending = self._pending, []
        with self.inbox.unbounded():
            return all(_wait(info, deadline - time.monotonic()) for info in pending)

    def close(self) -> None:
        """Disconnect; a persistent transport's session ends with it."""
        self._closing = True
        self.inbox.close()
        properties = None
        if self.persistent and self.url.mqtt5:
            properties = _properties(PacketTypes.DISCONNECT, SessionExpiryInterval=0)
        self._client.disconnect(properties=properties)
        self._client.loop_stop()
        if self.persistent and not self.url.mqtt5:
            self._end_session()


def _properties(packet: int, **values: int) -> Properties:
    """MQTT 5 properties of one packet type (``SessionExpiryInterval=0``, ...)."""
    properties = Properties(packet)  # type: ignore[no-untyped-call]
    for name, value in values.items():
        setattr(properties, name, value)
    return properties


def _unreachable(exc: OSError, url: BrokerUrl) -> str:
    """Why a TCP connection failed, in words."""
    if isinstance(exc, ConnectionRefusedError):
        return f"nothing listens on {url.host} port {url.port}: connection refused"
    if isinstance(exc, TimeoutError):
        return "no answer: timed out"
    return exc.strerror or str(exc)


def _refusal(rc: object, settings: BrokerSettings) -> str:
    """The broker's CONNACK refusal, with what to check."""
    text = str(rc)
    lowered = text.lower()
    if "user name or password" in lowered or "not authori" in lowered:
        if settings.username is None:
            hint = "it needs credentials: --credentials FILE or FEDPRUNE_MQTT_USERNAME/PASSWORD"
        else:
            hint = f"check the credentials of user {settings.username!r}"
        return f"{text} ({hint})"
    return text


def _settled(info: mqtt.MQTTMessageInfo) -> bool:
    """Acknowledged, or failed (paho raises for a message it could not hand to a connection)."""
    try:
        return info.is_published()
    except (RuntimeError, ValueError):
        return True


def _wait(info: mqtt.MQTTMessageInfo, timeout: float) -> bool:
    """Whether the broker acknowledged the message within ``timeout`` seconds."""
    try:
        if timeout > 0:
            info.wait_for_publish(timeout)
        return info.is_published()
    except (RuntimeError, ValueError):
        return False


def topic_matches(pattern: str, topic: str) -> bool:
    """MQTT wildcard matching (``+`` one level, ``#`` the rest)."""
    return mqtt.topic_matches_sub(pattern, topic)
