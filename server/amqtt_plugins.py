"""Plugins of the embedded amqtt broker (:mod:`server.broker`); amqtt loads them by dotted path."""

from __future__ import annotations

from dataclasses import dataclass

from amqtt.plugins.base import BaseAuthPlugin
from amqtt.session import Session


class LoopbackAuthPlugin(BaseAuthPlugin):  # type: ignore[misc]  # amqtt ships no types
    """Accept every client as a named, not anonymous, session.

    MQTT 3.1.1 (section 3.1.2.4) requires a broker to keep a persistent session (clean session 0) with
    its subscriptions and queued QoS 1 messages while the client is away; amqtt does so only for
    sessions it does not mark anonymous, and its anonymous-access plugin marks every one. The embedded
    broker listens on loopback for the demo and the tests; deployments use mosquitto with TLS client
    certificates and ACLs (``deploy/mosquitto``).
    """

    @dataclass
    class Config:
        """No options."""

    async def authenticate(self, *, session: Session) -> bool:
        """Every loopback client is let in."""
        return True
