"""The network behind a small interface. This is the only module that imports paho-mqtt.

Incoming messages are put on a queue that the owner drains from its own thread: nothing runs inside
paho's callbacks except that, which avoids paho's publish-from-callback deadlocks. On every
reconnect the subscriptions are renewed and this side's retained messages are published again (the
broker may have restarted without them, or replaced one with our last will), so both sides pick up
where they were.
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

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from fedprune.edge_client.connection import BrokerSettings, BrokerUrl
from fedprune.edge_client.errors import BrokerError, OversizeError

__all__ = ["BrokerSettings", "BrokerUrl", "Incoming", "MqttTransport", "Transport", "topic_matches"]

Incoming = tuple[str, bytes]

log = logging.getLogger("fedprune.transport")


class Inbox:
    """A queue of incoming messages that holds at most ``limit`` payload bytes (0: any): a put
    beyond that waits until the reader has taken enough, so that a burst the reader cannot keep
    up with waits at the broker (TCP back-pressure) instead of in this process's memory, until
    the reader has brought it down to half (so that the two threads take turns in batches, not
    message by message). A message alone in the queue is always taken, however big.

    The put runs on the MQTT network thread, which also reads acknowledgements: while the reader
    waits for one (:meth:`unbounded`) puts do not wait, and after :meth:`close` they drop."""

    def __init__(self, limit: int = 0) -> None:
        self.limit = limit
        self._items: collections.deque[Incoming] = collections.deque()
        self._held = 0
        self._unbounded = 0  # readers waiting for the network thread
        self._closed = False
        self._changed = threading.Condition()

    def put(self, item: Incoming) -> None:
        with self._changed:
            if self.limit and self._items and self._held + len(item[1]) > self.limit:
                self._changed.wait_for(
                    lambda: self._unbounded or self._closed or not self._items
                    or self._held <= self.limit // 2
                )  # fmt: skip
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


INBOX_BYTES = 64 * 1024 * 1024
"""What an MQTT transport holds of received payloads before it stops reading from the broker."""


class Transport(ABC):
    """Publish bytes to topics and receive what matches the subscriptions, in order."""

    def __init__(self, *, max_payload: int, inbox_bytes: int = 0) -> None:
        self.max_payload = max_payload
        self.inbox = Inbox(inbox_bytes)

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

    @abstractmethod
    def _publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> None: ...

    @abstractmethod
    def subscribe(self, pattern: str, qos: int = 1) -> None: ...

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
    resubscription. The MQTT client id is ``client_id`` itself, so that broker ACLs can name it."""

    def __init__(
        self,
        broker: str | BrokerUrl | BrokerSettings,
        *,
        client_id: str,
        will: tuple[str, bytes] | None = None,
        max_payload: int = 256 * 1024,
        connect_attempts: int = 5,
        inbox_bytes: int = INBOX_BYTES,
    ) -> None:
        """``inbox_bytes`` bounds what is received and not yet taken (:class:`Inbox`)."""
        super().__init__(max_payload=max_payload, inbox_bytes=inbox_bytes)
        if isinstance(broker, str):
            broker = BrokerUrl.parse(broker)
        self.settings = broker if isinstance(broker, BrokerSettings) else BrokerSettings(url=broker)
        self.url = self.settings.url
        self._subscriptions: dict[str, int] = {}
        self._connected = threading.Event()
        self._refused: str | None = None  # why the broker turned us away, before it accepted us
        self._pending: list[mqtt.MQTTMessageInfo] = []  # QoS 1 publishes maybe not yet acked
        self._prune_at = 64  # forget the acknowledged ones when there are this many
        self._lock = threading.Lock()
        self._retained: dict[str, bytes] = {}
        self._subacks: dict[int, threading.Event] = {}
        protocol = MQTTProtocolVersion.MQTTv5 if self.url.mqtt5 else MQTTProtocolVersion.MQTTv311
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol
        )
        self._client.reconnect_delay_set(min_delay=1, max_delay=8)
        self._secure(self.settings)
        if will is not None:
            self._client.will_set(will[0], will[1], qos=1, retain=True)
        self._up_since = -math.inf  # when the connection came back (monotonic); inf while down
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe
        self._connect(connect_attempts)

    def _secure(self, settings: BrokerSettings) -> None:
        if settings.url.tls:
            try:
                self._client.tls_set(
                    ca_certs=None if settings.ca is None else str(settings.ca),
                    certfile=None if settings.cert is None else str(settings.cert),
                    keyfile=None if settings.key is None else str(settings.key),
                    cert_reqs=ssl.CERT_REQUIRED,
                )
            except (ssl.SSLError, OSError) as exc:
                raise BrokerError(f"cannot use the TLS files for {self.url}: {exc}") from exc
        if settings.username is not None:
            self._client.username_pw_set(settings.username, settings.password)

    def _connect(self, attempts: int) -> None:
        delay = 0.5
        log.info("connecting to the MQTT broker at %s", self.url)
        for attempt in range(1, attempts + 1):
            try:
                self._client.connect(self.url.host, self.url.port, keepalive=30)
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
                    self.url, reason, attempt, attempts, delay,
                )  # fmt: skip
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
        self, client: mqtt.Client, _u: object, _f: object, rc: object, _p: object
    ) -> None:
        if getattr(rc, "is_failure", False):
            if not self._connected.is_set():
                self._refused = _refusal(rc, self.settings)
            return
        if self._up_since == math.inf:  # back after a drop (the first connection counts as old)
            self._up_since = time.monotonic()
        for pattern, qos in list(self._subscriptions.items()):
            client.subscribe(pattern, qos)
        with self._lock:
            retained = list(self._retained.items())
        for topic, payload in retained:
            client.publish(topic, payload, qos=1, retain=True)
        self._connected.set()

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
        self._connected.clear()
        self._up_since = math.inf

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        self.inbox.put((msg.topic, bytes(msg.payload)))

    def subscribe(self, pattern: str, qos: int = 1) -> None:
        """Subscribe and wait (up to 10 s) for the broker's acknowledgement, so that nothing
        published after this returns can be missed."""
        self._subscriptions[pattern] = qos
        result, mid = self._client.subscribe(pattern, qos)
        if result != mqtt.MQTT_ERR_SUCCESS or mid is None:
            return  # not connected: _on_connect subscribes again
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
            self._client.unsubscribe(pattern)

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
        self.inbox.close()
        self._client.disconnect()
        self._client.loop_stop()


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
