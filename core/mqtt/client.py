"""The only module that imports paho: a narrow MQTT client (publish, subscribe -> unsubscribe, close).

- MQTT v5 when the broker offers it; a broker that refuses v5 ("unsupported protocol version",
  e.g. amqtt) gets a 3.1.1 reconnect, once, automatically (``protocol="auto"``). So does a broker that
  drops a v5 CONNECT without any CONNACK (some 3.1.1-only brokers do when the CONNECT carries a will).
  The process remembers such brokers, so its later clients speak 3.1.1 to them from the start.
  Nothing depends on v5: its extras (session expiry, response topic, correlation data) are only used
  when the broker speaks it.
- Reconnects forever with exponential backoff; subscriptions are restored on every connect.
- Every callback runs on paho's network thread inside a try/except that logs the topic (never the
  payload), so a bad message or a buggy handler can never kill the network loop.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from core.config import MqttConnection

logger = logging.getLogger(__name__)

# CONNACK codes meaning "this broker does not speak the protocol version you asked for":
# 0x84 in a v5 CONNACK, 1 when a 3.1.1-only broker answers in its own format.
UNSUPPORTED_PROTOCOL_CODES = frozenset({0x84, 1})
# A persistent session (server subscribers) survives this long without the client (v5 only).
SESSION_EXPIRY_S = 7 * 24 * 3600
# Reconnect backoff bounds: short enough that a restarted broker is found quickly.
RECONNECT_MIN_S = 1
RECONNECT_MAX_S = 8
# How long close() waits for the DISCONNECT to be written.
CLOSE_TIMEOUT_S = 2.0

Protocol = Literal["auto", "5", "3.1.1"]
MessageCallback = Callable[["Message"], None]


# Brokers (host, port) that refused MQTT v5 in this process: later "auto" clients start with 3.1.1.
_V311_BROKERS: set[tuple[str, int]] = set()
_V311_LOCK = threading.Lock()


def _known_311(host: str, port: int) -> bool:
    with _V311_LOCK:
        return (host, port) in _V311_BROKERS


def _remember_311(host: str, port: int) -> None:
    with _V311_LOCK:
        _V311_BROKERS.add((host, port))


class MqttError(Exception):
    """The client could not be configured (bad TLS files, invalid settings)."""


SHARE_PREFIX = "$share/"


def shared(group: str | None, filter_: str) -> str:
    """``filter_`` as an MQTT v5 shared subscription of ``group`` (each message reaches one member);
    ``filter_`` itself when ``group`` is None."""
    if group is None:
        return filter_
    if not group or any(c in group for c in "/+#"):
        raise ValueError(f"share group {group!r} must be one topic level without wildcards")
    return f"{SHARE_PREFIX}{group}/{filter_}"


def unshared(filter_: str) -> str:
    """The topic filter inside a ``$share/<group>/<filter>`` subscription (any other filter unchanged)."""
    if filter_.startswith(SHARE_PREFIX):
        parts = filter_.split("/", 2)
        if len(parts) == 3:
            return parts[2]
    return filter_


def topic_matches(filter_: str, topic: str) -> bool:
    """True when ``topic`` matches the subscription ``filter_`` (MQTT wildcard rules; a shared
    subscription matches what its inner filter matches)."""
    return bool(paho.topic_matches_sub(unshared(filter_), topic))


@dataclass(frozen=True, slots=True)
class Message:
    """A received message; ``response_topic``/``correlation_data`` are set by v5 requesters."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    response_topic: str | None = None
    correlation_data: bytes | None = None


@dataclass(frozen=True, slots=True)
class Will:
    """Last-will message the broker publishes when the client vanishes."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True, slots=True)
class ClientSettings:
    """Connection settings; build them from a ``MqttConfig`` with :meth:`from_config`."""

    host: str
    port: int
    client_id: str
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    keepalive_s: int = 30
    protocol: Protocol = "auto"
    persistent_session: bool = False
    reconnect_max_s: int = RECONNECT_MAX_S

    @classmethod
    def from_config(cls, config: MqttConnection, client_id: str,
                    persistent_session: bool = False) -> ClientSettings:
        """Settings from a device's or the server's ``[mqtt]`` section (the one constructor)."""
        return cls(host=config.host, port=config.port, client_id=client_id, username=config.username,
                   password=config.password_text(), tls=config.tls, ca_file=config.ca_file,
                   cert_file=config.cert_file, key_file=config.key_file, keepalive_s=config.keepalive_s,
                   persistent_session=persistent_session)


def settings_from(config: MqttConnection, client_id: str, persistent_session: bool = False,
                  host: str | None = None, port: int | None = None) -> ClientSettings:
    """Client settings from an ``[mqtt]`` section, optionally pointed at another host/port."""
    settings = ClientSettings.from_config(config, client_id, persistent_session)
    if host is None and port is None:
        return settings
    return replace(settings, host=host or settings.host, port=port or settings.port)


def paho_client(settings: ClientSettings, *, v5: bool, clean_session: bool | None = None,
                manual_ack: bool = False) -> paho.Client:
    """The one paho construction: protocol, reconnect backoff, credentials and TLS (MqttError on bad TLS)."""
    kwargs: dict[str, Any] = {}
    if clean_session is not None and not v5:
        kwargs["clean_session"] = clean_session
    if manual_ack:
        kwargs["manual_ack"] = True
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=settings.client_id,
                         protocol=paho.MQTTv5 if v5 else paho.MQTTv311, **kwargs)
    client.suppress_exceptions = True  # second line of defence; our handlers already catch
    client.reconnect_delay_set(RECONNECT_MIN_S, max(RECONNECT_MIN_S, settings.reconnect_max_s))
    if settings.username is not None:
        client.username_pw_set(settings.username, settings.password)
    if settings.tls:
        try:
            client.tls_set(ca_certs=str(settings.ca_file) if settings.ca_file else None,
                           certfile=str(settings.cert_file) if settings.cert_file else None,
                           keyfile=str(settings.key_file) if settings.key_file else None)
        except (OSError, ValueError) as exc:
            raise MqttError(f"TLS setup failed for {settings.host}:{settings.port}: {exc}") from exc
    return client


def connect_async(client: paho.Client, settings: ClientSettings, *, v5: bool) -> None:
    """Connect in the background and start the network thread; with MQTT v5 a persistent session is
    ``clean_start=False`` plus a session expiry (3.1.1 takes ``clean_session`` at construction)."""
    s = settings
    if v5:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        if s.persistent_session:
            props.SessionExpiryInterval = SESSION_EXPIRY_S
        client.connect_async(s.host, s.port, s.keepalive_s, clean_start=not s.persistent_session,
                             properties=props)
    else:
        client.connect_async(s.host, s.port, s.keepalive_s)
    client.loop_start()


class PublishHandle:
    """Outcome of one publish: its message id and a way to wait for the broker's acknowledgement."""

    def __init__(self, info: paho.MQTTMessageInfo | None) -> None:
        self._info = info

    @property
    def mid(self) -> int:
        """Message id (0 when the message could not be queued)."""
        return self._info.mid if self._info is not None else 0

    @property
    def queued(self) -> bool:
        """True when paho accepted the message (sent now or queued for the next connection)."""
        return self._info is not None and self._info.rc in (MQTTErrorCode.MQTT_ERR_SUCCESS,
                                                            MQTTErrorCode.MQTT_ERR_NO_CONN)

    @property
    def sent(self) -> bool:
        """True when the message went to the socket (the client was connected)."""
        return self._info is not None and self._info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS

    def is_published(self) -> bool:
        """True once the broker acknowledged it (or, for QoS 0, once written)."""
        return self._info is not None and self._info.is_published()

    def wait_for_publish(self, timeout: float | None = None) -> bool:
        """Block until acknowledged or ``timeout``; False when it was not (or could not be) published."""
        if self._info is None:
            return False
        try:
            self._info.wait_for_publish(timeout)
        except (ValueError, RuntimeError):
            return False
        return self._info.is_published()


class MqttClient:
    """A reconnecting MQTT client with callback-isolated subscriptions; a context manager."""

    def __init__(self, settings: ClientSettings, will: Will | None = None) -> None:
        self.settings = settings
        self.will = will
        self._lock = threading.RLock()
        self._subs: dict[str, list[tuple[int, MessageCallback]]] = {}
        self._token = 0
        self._connect_listeners: dict[int, Callable[[], None]] = {}
        self._disconnect_listeners: dict[int, Callable[[], None]] = {}
        self._publish_listeners: dict[int, Callable[[int, bool], None]] = {}
        self._connected = threading.Event()
        # Set under _lock together with on_connect's snapshot of the subscriptions: a subscribe() racing
        # a (re)connect is either in that snapshot or sees it set and subscribes itself, so no filter is
        # left unsubscribed for the whole connection (a door missing its bundle topics until reconnect).
        self._live = False
        self._closed = False
        self._connack_seen = False  # a CONNACK (of any verdict) answered the current connection attempt
        self.generation = 0
        v5 = settings.protocol == "5" or (settings.protocol == "auto" and not _known_311(settings.host,
                                                                                            settings.port))
        self.protocol_version = 5 if v5 else 4
        self._client = self._make_client()
        self._started = False

    # ------------------------------------------------------------------ lifecycle

    def _make_client(self) -> paho.Client:
        s = self.settings
        client = paho_client(s, v5=self.protocol_version == 5, clean_session=not s.persistent_session)
        client.max_queued_messages_set(0)
        if self.will is not None:
            client.will_set(self.will.topic, self.will.payload, self.will.qos, self.will.retain)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        return client

    def _connect_async(self, client: paho.Client) -> None:
        connect_async(client, self.settings, v5=self.protocol_version == 5)

    def start(self) -> MqttClient:
        """Connect in the background (returns at once; the device works without a broker)."""
        with self._lock:
            if self._closed:
                raise MqttError("client is closed")
            if not self._started:
                self._started = True
                self._connect_async(self._client)
        return self

    def wait_connected(self, timeout: float | None = None) -> bool:
        """Block until connected or ``timeout``; True when connected."""
        return self._connected.wait(timeout)

    @property
    def connected(self) -> bool:
        """True while a broker session is up."""
        return self._connected.is_set()

    def close(self) -> None:
        """Disconnect cleanly and stop the network thread (safe to call twice)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            client = self._client
        try:
            if self._connected.is_set():
                client.disconnect()
        except (OSError, ValueError):
            logger.debug("disconnect failed", exc_info=True)
        client.loop_stop()
        self._connected.clear()

    def __enter__(self) -> MqttClient:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _fall_back_to_311(self, old: paho.Client, why: str) -> None:
        _remember_311(self.settings.host, self.settings.port)
        old.loop_stop()
        with self._lock:
            if self._closed or old is not self._client:
                return
            self.protocol_version = 4
            self._client = self._make_client()
            self._connect_async(self._client)
        logger.info("broker %s:%d %s; using MQTT 3.1.1", self.settings.host, self.settings.port, why)

    def _start_fallback(self, client: paho.Client, why: str) -> None:
        threading.Thread(target=self._fall_back_to_311, args=(client, why), daemon=True,
                         name="mqtt-fallback").start()

    # ------------------------------------------------------------------ listeners

    def _add(self, table: dict[int, Any], callback: Any) -> Callable[[], None]:
        with self._lock:
            self._token += 1
            token = self._token
            table[token] = callback

        def remove() -> None:
            with self._lock:
                table.pop(token, None)

        return remove

    def on_connected(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback()`` after every successful (re)connect, on the network thread (a caller that
        registers while connected checks ``connected`` itself: it may miss that connection)."""
        return self._add(self._connect_listeners, callback)

    def on_disconnected(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback()`` after every lost connection."""
        return self._add(self._disconnect_listeners, callback)

    def on_published(self, callback: Callable[[int, bool], None]) -> Callable[[], None]:
        """Call ``callback(mid, ok)`` when the broker acknowledges a QoS>0 publish (PUBACK)."""
        return self._add(self._publish_listeners, callback)

    # ------------------------------------------------------------------ publish / subscribe

    def publish(self, topic: str, payload: bytes | str, qos: int = 0, retain: bool = False, *,
                response_topic: str | None = None, correlation_data: bytes | None = None) -> PublishHandle:
        """Publish; QoS>0 messages are queued while disconnected and sent on reconnect."""
        with self._lock:
            client = self._client
            v5 = self.protocol_version == 5
        props = None
        if v5 and (response_topic or correlation_data):
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            if response_topic:
                props.ResponseTopic = response_topic
            if correlation_data:
                props.CorrelationData = correlation_data
        try:
            info = client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        except (ValueError, TypeError) as exc:
            logger.warning("publish to %s refused: %s", topic, exc)
            return PublishHandle(None)
        return PublishHandle(info)

    def subscribe(self, filter_: str, callback: MessageCallback, qos: int = 1) -> Callable[[], None]:
        """Deliver messages matching ``filter_`` to ``callback``; returns the unsubscribe function."""
        with self._lock:
            self._token += 1
            token = self._token
            first = filter_ not in self._subs
            self._subs.setdefault(filter_, []).append((token, callback))
            client = self._client
            now = first and self._live
        if now:
            client.subscribe(filter_, qos)

        def unsubscribe() -> None:
            with self._lock:
                entries = [e for e in self._subs.get(filter_, []) if e[0] != token]
                if entries:
                    self._subs[filter_] = entries
                    return
                self._subs.pop(filter_, None)
                live = self._connected.is_set() and not self._closed
                client = self._client
            if live:
                client.unsubscribe(filter_)

        return unsubscribe

    # ------------------------------------------------------------------ paho callbacks (network thread)

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason_code: ReasonCode,
                    properties: Any) -> None:
        try:
            self._connack_seen = True
            if reason_code.is_failure:
                if (self.settings.protocol == "auto" and self.protocol_version == 5
                        and reason_code.value in UNSUPPORTED_PROTOCOL_CODES):
                    self._start_fallback(client, "refused MQTT v5")
                else:
                    logger.warning("broker %s:%d refused the connection: %s", self.settings.host,
                                   self.settings.port, reason_code)
                return
            with self._lock:
                filters = list(self._subs)
                self.generation += 1
                listeners = list(self._connect_listeners.values())
                self._live = True
            for filter_ in filters:
                client.subscribe(filter_, 1)
            self._connected.set()
            logger.info("connected to %s:%d (MQTT %s)", self.settings.host, self.settings.port,
                        "5" if self.protocol_version == 5 else "3.1.1")
            for listener in listeners:
                self._safely(listener, "connect listener")
        except Exception:
            logger.exception("on_connect handler failed")

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason_code: ReasonCode,
                       properties: Any) -> None:
        try:
            was = self._connected.is_set()
            with self._lock:
                self._live = False
            self._connected.clear()
            answered, self._connack_seen = self._connack_seen, False
            if (not answered and not self._closed and self.settings.protocol == "auto"
                    and self.protocol_version == 5):
                self._start_fallback(client, "closed an MQTT v5 connection without a CONNACK")
            if was and not self._closed:
                logger.warning("lost the broker %s:%d (%s); reconnecting", self.settings.host,
                               self.settings.port, reason_code)
            with self._lock:
                listeners = list(self._disconnect_listeners.values())
            for listener in listeners:
                self._safely(listener, "disconnect listener")
        except Exception:
            logger.exception("on_disconnect handler failed")

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason_code: ReasonCode,
                    properties: Any) -> None:
        # Runs while paho holds its outgoing-message lock: listeners must not publish or block.
        try:
            ok = not reason_code.is_failure
            with self._lock:
                listeners = list(self._publish_listeners.values())
            for listener in listeners:
                listener(mid, ok)
        except Exception:
            logger.exception("on_publish handler failed for mid %d", mid)

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        topic = "<undecodable>"
        try:
            topic = msg.topic
            props = getattr(msg, "properties", None)
            response_topic = getattr(props, "ResponseTopic", None) if props is not None else None
            correlation = getattr(props, "CorrelationData", None) if props is not None else None
            message = Message(topic=topic, payload=bytes(msg.payload), qos=msg.qos, retain=bool(msg.retain),
                              response_topic=response_topic if isinstance(response_topic, str) else None,
                              correlation_data=bytes(correlation) if correlation else None)
            with self._lock:
                targets = [cb for f, entries in self._subs.items() if topic_matches(f, topic)
                           for _, cb in entries]
            for callback in targets:
                try:
                    callback(message)
                except Exception as exc:
                    # The exception text may quote the payload; log only its type and the topic.
                    logger.error("handler for %s raised %s", topic, type(exc).__name__,
                                 exc_info=logger.isEnabledFor(logging.DEBUG))
        except Exception as exc:
            logger.error("dispatch of a message on %s failed: %s", topic, type(exc).__name__)

    @staticmethod
    def _safely(callback: Callable[[], None], what: str) -> None:
        try:
            callback()
        except Exception as exc:
            logger.error("%s raised %s", what, type(exc).__name__, exc_info=True)
