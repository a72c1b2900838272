"""A site mosquitto bridged to the central one: the bridge stanza for the site broker and the central
broker's ACL block for that bridge, both derived from the same topic list.

Doors talk only to their site's broker; the server runs at the central one. The bridge carries that
site's topics and nothing else (never ``#``):

- out (site -> central): events, status, availability, bundle/delta acks, chunk requests, command
  responses, and snapshots only when they are opted in (they are images);
- in (central -> site): bundle announcements, broadcast chunks, gallery deltas, chunks re-sent to one
  door, the server's event receipts, and commands.

QoS 1 both ways with a persistent session (``cleansession false`` and a stable ``remote_clientid``): while
the link is down the site broker queues what goes out and the central broker queues what comes in, each up
to its ``max_queued_messages`` (sized in deploy/mosquitto/bridge-site.conf.example); the doors' outboxes
(events stay until the server's receipt) and the server's re-offers (announcement, delta) cover anything
beyond that. The bridge user at the central broker is ``bridge-<site>`` (the CN of the bridge
certificate, ``make-certs.sh bridge SITE``), and its ACL block lets it write and read only its own site.

``facegate server bridge-config`` prints either part.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import click

from core.protocol.topics import Topics

Direction = Literal["out", "in"]

BRIDGE_QOS = 1  # every facegate message is QoS 1; the bridge must not downgrade it
# Reconnect backoff of the bridge (mosquitto `restart_timeout base cap`): retry soon after a short cut,
# without hammering a central broker that is down for long.
RESTART_BASE_S, RESTART_CAP_S = 5, 60
# Keep-alive of the bridge connection: a silent WAN cut is noticed within 1.5 of this.
KEEPALIVE_S = 30
CERTS = Path("/etc/mosquitto/certs")  # where deploy/mosquitto puts a broker's certificates


def bridge_user(site: str) -> str:
    """The central broker's user name (certificate CN) for ``site``'s bridge."""
    return f"bridge-{Topics(site=site).site}"


def bridge_client_id(topics: Topics) -> str:
    """The stable client id the bridge uses at the central broker (its persistent session)."""
    return f"{topics.prefix}-bridge-{topics.site}"


def bridge_topics(topics: Topics, snapshots: bool = False) -> list[tuple[str, Direction]]:
    """Every topic filter the site's bridge carries, with its direction; all under ``<prefix>/<site>/``."""
    t = topics
    out = [t.all_events, t.all_status, t.all_available, t.all_bundle_acks, t.all_bundle_requests,
           t.all_command_responses] + ([t.all_snapshots] if snapshots else [])
    inbound = [t.bundle_announce, t.all_bundle_chunks, t.gallery_delta, t.all_bundle_chunk_replies,
               t.all_events_confirms, t.all_commands]
    return [(f, "out") for f in out] + [(f, "in") for f in inbound]


@dataclass(frozen=True, slots=True)
class BridgeTls:
    """The bridge's TLS files on the site broker: the central CA and the site's bridge certificate."""

    cafile: Path
    certfile: Path
    keyfile: Path


def bridge_conf(topics: Topics, address: str, tls: BridgeTls | None, *, snapshots: bool = False,
                restart_s: tuple[int, int] = (RESTART_BASE_S, RESTART_CAP_S),
                keepalive_s: int = KEEPALIVE_S) -> str:
    """The mosquitto bridge stanza for the site broker (append it to the site's mosquitto.conf)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"central broker address {address!r}: expected HOST:PORT")
    lines = [
        f"# facegate bridge: site {topics.site} -> central broker {address} (server/bridge.py)",
        f"connection {topics.prefix}-{topics.site}",
        f"address {address}",
        "bridge_protocol_version mqttv311",
        f"remote_clientid {bridge_client_id(topics)}",
        "# A persistent session both ways: each broker queues for the other while the link is down.",
        "cleansession false",
        f"keepalive_interval {keepalive_s}",
        f"restart_timeout {restart_s[0]} {restart_s[1]}",
        "start_type automatic",
        "# 1 while the bridge is up, 0 (the bridge's will at the central broker) once it drops.",
        "notifications true",
        f"notification_topic {topics.bridge_state}",
    ]
    if tls is not None:
        lines += [
            f"bridge_cafile {tls.cafile}",
            f"bridge_certfile {tls.certfile}",
            f"bridge_keyfile {tls.keyfile}",
            "bridge_tls_version tlsv1.2",
            "bridge_insecure false",
        ]
    else:
        lines.append("# PLAIN TCP: for a test or a link that is already encrypted (VPN); use TLS otherwise.")
    lines.append(f"# Only this site's topics, QoS {BRIDGE_QOS}; never '#'.")
    lines += [f"topic {pattern} {direction} {BRIDGE_QOS}" for pattern, direction in
              bridge_topics(topics, snapshots)]
    return "\n".join(lines) + "\n"


def bridge_acl(topics: Topics, snapshots: bool = False) -> str:
    """The central broker's ACL block for ``topics.site``'s bridge: its own site's topics only."""
    lines = [f"user {bridge_user(topics.site)}"]
    lines += [f"topic {'write' if d == 'out' else 'read'} {pattern}" for pattern, d in
              bridge_topics(topics, snapshots)]
    lines.append(f"topic write {topics.bridge_state}")
    return "\n".join(lines) + "\n"


@click.command("bridge-config")
@click.option("--site", required=True, help="The site id (the doors' [device] site).")
@click.option("--central", "address", default="central.example.org:8883", show_default=True,
              help="The central broker, HOST:PORT.")
@click.option("--prefix", default="facegate", show_default=True, help="Topic prefix ([mqtt] prefix).")
@click.option("--cafile", type=click.Path(path_type=Path), default=CERTS / "central-ca.crt",
              show_default=True, help="The central broker's CA certificate, on the site broker.")
@click.option("--certfile", type=click.Path(path_type=Path), default=None,
              help="The site's bridge certificate [default: /etc/mosquitto/certs/bridge-SITE.crt].")
@click.option("--keyfile", type=click.Path(path_type=Path), default=None,
              help="Its key [default: /etc/mosquitto/certs/bridge-SITE.key].")
@click.option("--plain", is_flag=True, help="No TLS on the bridge (tests, or a link already encrypted).")
@click.option("--snapshots", is_flag=True, help="Also carry the opt-in snapshot images to the central one.")
@click.option("--acl", "acl", is_flag=True, help="Print the central broker's ACL block for this bridge.")
def bridge_config(site: str, address: str, prefix: str, cafile: Path, certfile: Path | None,
                  keyfile: Path | None, plain: bool, snapshots: bool, acl: bool) -> None:
    """Print the site broker's bridge stanza (or, with --acl, the central ACL block) for SITE."""
    try:
        topics = Topics(prefix, site)
        if acl:
            click.echo(bridge_acl(topics, snapshots), nl=False)
            return
        tls = None if plain else BridgeTls(cafile, certfile or CERTS / f"{bridge_user(site)}.crt",
                                           keyfile or CERTS / f"{bridge_user(site)}.key")
        click.echo(bridge_conf(topics, address, tls, snapshots=snapshots), nl=False)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
