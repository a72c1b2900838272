"""The audit subscriber's MQTT transport: paho with *manual* acknowledgements and a persistent session.

``core.mqtt.client`` acknowledges a QoS 1 message as soon as its callback returns. The audit log
needs more: the PUBACK must wait until the event is committed to the database, so a server crash
between receipt and commit makes the broker redeliver instead of losing the event (the idempotent
insert absorbs the duplicate). This module is the server's one paho adapter for that; core code
sees only :class:`Delivery` and its ``ack``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.reasoncodes import ReasonCode

from core.mqtt.client import MqttError, connect_async, paho_client, settings_from, shared
from server.config import MqttConfig

logger = logging.getLogger(__name__)



class TransportError(Exception):
    """The MQTT client could not be configured (TLS files, settings)."""


@dataclass(frozen=True, slots=True)
class Delivery:
    """A received message; call ``ack()`` once it is durably stored (no-op for QoS 0)."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    ack: Callable[[], None]


class ManualAckSource:
    """Subscribes to ``filters`` at QoS 1 and hands each message to ``handler`` without acknowledging it."""

    def __init__(self, config: MqttConfig, filters: list[str], handler: Callable[[Delivery], None],
                 client_id: str | None = None, on_subscribed: Callable[[], None] | None = None) -> None:
        self.config = config
        self.filters = list(filters)
        self._handler = handler
        self._on_subscribed = on_subscribed  # after every (re)subscription, on paho's network thread
        self._connected = threading.Event()
        self._closed = False
        self._started = False
        self._lock = threading.Lock()
        # A persistent session: the broker keeps our subscriptions and queues QoS 1 events while the
        # server is down. One server: MQTT 3.1.1 with clean_session=False (mosquitto and amqtt both
        # support it). Replicas ([mqtt] share_group): MQTT v5 with a session expiry, subscribed through
        # $share/<group>/..., so each message reaches one replica.
        self.share_group = config.share_group
        self._v5 = self.share_group is not None
        self._subscriptions = [shared(self.share_group, f) for f in self.filters]
        self._settings = settings_from(config, client_id or config.client_id, persistent_session=True)
        try:
            self._client = paho_client(self._settings, v5=self._v5, clean_session=False, manual_ack=True)
        except MqttError as exc:
            raise TransportError(str(exc)) from exc
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message

    def start(self) -> ManualAckSource:
        """Connect in the background; the server keeps running while the broker is away."""
        with self._lock:
            if self._closed:
                raise TransportError("source is closed")
            if not self._started:
                self._started = True
                connect_async(self._client, self._settings, v5=self._v5)
        return self

    def wait_connected(self, timeout: float | None = None) -> bool:
        """Block until subscribed or ``timeout``."""
        return self._connected.wait(timeout)

    @property
    def connected(self) -> bool:
        """True while connected and subscribed."""
        return self._connected.is_set()

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> bool:
        """Publish (e.g. a door's event receipt); False when it could not even be queued."""
        try:
            info = self._client.publish(topic, payload, qos=qos)
        except (ValueError, TypeError) as exc:
            logger.warning("publish to %s refused: %s", topic, exc)
            return False
        return info.rc in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN)

    def close(self) -> None:
        """Disconnect and stop the network thread (idempotent). Unacked messages are redelivered later."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            started = self._started
        if started:
            try:
                self._client.disconnect()
            except (OSError, ValueError):
                logger.debug("disconnect failed", exc_info=True)
            self._client.loop_stop()
        self._connected.clear()

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason_code: ReasonCode,
                    properties: Any) -> None:
        try:
            if reason_code.is_failure:
                logger.warning("broker %s:%d refused the audit subscriber: %s", self.config.host,
                               self.config.port, reason_code)
                return
            client.subscribe([(f, 1) for f in self._subscriptions])
            self._connected.set()
            logger.info("audit subscriber connected to %s:%d%s", self.config.host, self.config.port,
                        f" (replica of share group {self.share_group})" if self.share_group else "")
        except Exception:
            logger.exception("audit on_connect failed")

    def _on_subscribe(self, client: paho.Client, userdata: Any, mid: int, reason_codes: Any,
                      properties: Any) -> None:
        if self._on_subscribed is None:
            return
        try:
            self._on_subscribed()
        except Exception:
            logger.exception("audit on_subscribed hook failed")

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason_code: ReasonCode,
                       properties: Any) -> None:
        if self._connected.is_set() and not self._closed:
            logger.warning("audit subscriber lost the broker (%s); reconnecting", reason_code)
        self._connected.clear()

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        topic = "<undecodable>"
        try:
            topic = msg.topic
            mid, qos = msg.mid, msg.qos

            def ack() -> None:
                if qos > 0 and not self._closed:
                    client.ack(mid, qos)

            self._handler(Delivery(topic, bytes(msg.payload), qos, bool(msg.retain), ack))
        except Exception as exc:
            # Never log the payload (events may carry names); the topic is enough to find the sender.
            logger.error("audit handler for %s raised %s", topic, type(exc).__name__)
