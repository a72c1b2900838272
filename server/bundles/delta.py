"""Gallery deltas over MQTT: the server's :class:`GallerySync` implementation.

The server keeps one cumulative ledger (``<root>/delta_state.json``): every person added or changed
since the last rebase (with all the templates added for them since, and the time of their latest add)
and every person ever removed (tombstones). Each change bumps the sequence, and the whole ledger is
signed and published retained on ``…/bundles/delta``. A device that was offline therefore needs only
the latest delta, and a removal reaches every device, including ones that join later.

A door rebuilds its working gallery as *its bundle + the latest delta*, so an add may leave the ledger
only when every door's bundle already holds it. Publishing a bundle is not enough: a door still on the
previous one would lose everyone enrolled in between. :meth:`DeltaLedger.rebase` therefore takes the
:class:`GalleryCoverage` of every bundle a door runs or may still install (see
:mod:`server.bundles.rebase`, which decides when from the doors' acks) and drops a person's add only
if each of those galleries contains the person and was exported after the add entered the ledger.
Tombstones always stay. A ledger written before add times were recorded loads with every add stamped
at load time ("unknown, but no later than now"), so only bundles exported after that can drop them.

The ledger holds names and templates, so on the server's disk it is sealed under the chip key
(AES-256-GCM, like the chips and templates in the database; ``facegate server rotate-chip-key``
re-seals it); a plaintext ledger from an older release is read once and written back sealed. Server
replicas share one data_dir: every change re-reads the ledger under an advisory lock
(``delta_state.lock``), so two replicas never hand out the same sequence.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from core.files import PRIVATE_MODE, atomic_write_bytes, exclusive_lock
from core.mqtt.client import MqttClient
from core.protocol.schemas import BundleAck, DeltaPerson, GalleryDelta, canonical_json, utcnow
from core.protocol.sealed import seal_delta
from core.protocol.topics import Topics
from server.bundles.signing import sign
from server.bundles.sitekeys import GallerySealer, SiteKeyError, SiteKeyring
from server.crypto import KEY_ID_BYTES, ChipCipher, CryptoError
from server.enrollment.sync import GalleryEntry, SyncError

logger = logging.getLogger(__name__)

STATE_FILE = "delta_state.json"
LOCK_FILE = "delta_state.lock"
LEDGER_ASSOCIATED = "facegate-delta-ledger"  # binds the sealed ledger to its purpose
NO_MODEL = "0" * 64
# How long a publish waits for the broker's PUBACK before the call returns anyway (paho keeps it queued,
# and the OfferKeeper offers the delta again on reconnect and on every hello from a door that lacks it).
PUBLISH_WAIT_S = 5.0
ADDED_AT = "added_at"  # per person in ``adds``: ISO time (UTC) of the person's latest add


@dataclass(frozen=True, slots=True)
class GalleryCoverage:
    """What one bundle's gallery is known to hold: the persons exported, as of the export's start."""

    sequence: int
    exported_at: dt.datetime
    persons: frozenset[str]

    def covers(self, person_id: str, added_at: dt.datetime) -> bool:
        """True when the export started after the add was recorded and holds the person."""
        return added_at < self.exported_at and person_id in self.persons


def _added_at(text: str) -> dt.datetime:
    """Parse a stored add time; naive times are refused (they cannot be compared with export times)."""
    when = dt.datetime.fromisoformat(text)
    if when.tzinfo is None:
        raise ValueError(f"add time {text!r} has no time zone")
    return when


def _is_plaintext(blob: bytes) -> bool:
    return blob.lstrip()[:1] == b"{"


def _open_ledger(blob: bytes, cipher: ChipCipher | None, path: Path) -> bytes:
    """The ledger's JSON from its file content (sealed, or plaintext from an older release)."""
    if _is_plaintext(blob):
        return blob
    if cipher is None:
        raise SyncError(f"gallery delta ledger {path} is sealed and no chip key was given to open it")
    try:
        return cipher.decrypt(blob, LEDGER_ASSOCIATED, what="gallery delta ledger")
    except CryptoError as exc:
        raise SyncError(f"gallery delta ledger {path} cannot be opened: {exc}") from exc


def reseal_ledger(root: Path, old: ChipCipher, new: ChipCipher) -> bool:
    """Re-seal the ledger under ``root`` from ``old`` to ``new`` (chip key rotation); False when there is
    none or it already is under ``new``. Safe to rerun after a crash."""
    path = Path(root) / STATE_FILE
    with exclusive_lock(Path(root) / LOCK_FILE):
        if not path.is_file():
            return False
        blob = path.read_bytes()
        if not _is_plaintext(blob) and blob[1 : 1 + KEY_ID_BYTES] == new.key_id:
            return False
        state = _open_ledger(blob, old, path)
        atomic_write_bytes(path, new.encrypt(state, LEDGER_ASSOCIATED), mode=PRIVATE_MODE)
    return True


class DeltaLedger:
    """The cumulative gallery changes since the last rebase, persisted atomically (sealed under
    ``cipher`` when given: the server always gives its chip cipher)."""

    def __init__(self, root: Path, cipher: ChipCipher | None = None) -> None:
        self.path = Path(root) / STATE_FILE
        self.cipher = cipher
        self.seq = 0
        self.bundle_sequence = 0
        self.model_sha256 = NO_MODEL
        self.adds: dict[str, dict[str, Any]] = {}
        self.removes: set[str] = set()
        if self.path.is_file():
            try:
                blob = self.path.read_bytes()
            except OSError as exc:
                raise SyncError(f"gallery delta ledger {self.path} is unreadable: {exc}") from exc
            plaintext = _is_plaintext(blob)
            try:
                state = json.loads(_open_ledger(blob, cipher, self.path))
                self.seq = int(state["seq"])
                self.bundle_sequence = int(state["bundle_sequence"])
                self.model_sha256 = str(state["model_sha256"])
                self.adds = dict(state["adds"])
                self.removes = set(state["removes"])
                # A ledger from before add times were kept: "unknown, but no later than now".
                loaded_at = utcnow().isoformat()
                for person in self.adds.values():
                    _added_at(person.setdefault(ADDED_AT, loaded_at))
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise SyncError(f"gallery delta ledger {self.path} is unreadable: {exc}") from exc
            if plaintext and cipher is not None:
                self._save()
                logger.warning("gallery delta ledger %s was plaintext (older release): sealed it under the "
                               "chip key", self.path)

    def save(self) -> None:
        """Persist the ledger atomically."""
        self._save()

    def _save(self) -> None:
        state = {"seq": self.seq, "bundle_sequence": self.bundle_sequence, "model_sha256": self.model_sha256,
                 "adds": self.adds, "removes": sorted(self.removes)}
        data = json.dumps(state).encode("utf-8")
        if self.cipher is not None:
            data = self.cipher.encrypt(data, LEDGER_ASSOCIATED)
        atomic_write_bytes(self.path, data, mode=PRIVATE_MODE)

    def add(self, model_sha256: str, entries: list[GalleryEntry]) -> int:
        """Record templates to add; return the new sequence."""
        if model_sha256 != self.model_sha256 and self.adds:
            logger.warning("gallery adds switch from embedder %s… to %s…: dropping %d earlier adds "
                           "(rebuild a bundle for them)", self.model_sha256[:12], model_sha256[:12],
                           len(self.adds))
            self.adds = {}
        self.model_sha256 = model_sha256
        # Taken after the caller committed the templates: an export that starts later sees them.
        now = utcnow().isoformat()
        for entry in entries:
            person = self.adds.setdefault(entry.person_id, {"name": entry.name, "templates": {}})
            person["name"] = entry.name
            person[ADDED_AT] = now
            person["templates"][entry.template_id] = [float(v) for v in entry.vector]
            self.removes.discard(entry.person_id)
        self.seq += 1
        self._save()
        return self.seq

    def remove(self, person_id: str) -> int:
        """Tombstone a person; return the new sequence."""
        self.adds.pop(person_id, None)
        self.removes.add(person_id)
        self.seq += 1
        self._save()
        return self.seq

    def droppable(self, coverage: Sequence[GalleryCoverage]) -> list[str]:
        """Persons whose add every gallery in ``coverage`` already holds (none for an empty coverage)."""
        if not coverage:
            return []
        return sorted(pid for pid, person in self.adds.items()
                      if all(c.covers(pid, _added_at(person[ADDED_AT])) for c in coverage))

    def rebase(self, bundle_sequence: int, coverage: Sequence[GalleryCoverage]) -> int | None:
        """Drop the adds that every covering gallery holds; return the new sequence, or None if unchanged.

        ``coverage`` must list every bundle a door runs or may still install; ``bundle_sequence`` is the
        oldest bundle a door runs. Tombstones stay: a door may still hold an older copy of the person.
        """
        dropped = self.droppable(coverage)
        if not dropped and bundle_sequence <= self.bundle_sequence:
            return None
        for pid in dropped:
            del self.adds[pid]
        self.bundle_sequence = max(self.bundle_sequence, bundle_sequence)
        self.seq += 1
        self._save()
        logger.info("gallery delta rebased on bundle %d: %d adds dropped, %d kept", self.bundle_sequence,
                    len(dropped), len(self.adds))
        return self.seq

    def delta(self, key: Ed25519PrivateKey, sealer: GallerySealer | None = None) -> GalleryDelta:
        """The signed cumulative delta, sealed to the site's doors when ``sealer`` is given."""
        add = [DeltaPerson(person_id=pid, name=p["name"], vectors=list(p["templates"].values())[-64:])
               for pid, p in sorted(self.adds.items())]
        unsigned = GalleryDelta(seq=max(self.seq, 1), bundle_sequence=self.bundle_sequence,
                                model_sha256=self.model_sha256, created=utcnow(), add=add,
                                remove=sorted(self.removes))
        if sealer is not None:  # sign-then-verify covers the ciphertext and the wraps
            unsigned = seal_delta(unsigned, sealer.key, sealer.version, sealer.keys)
        signature = sign(key, canonical_json(unsigned.signed_part()))
        return unsigned.model_copy(update={"signature": signature})


class MqttGallerySync:
    """Publishes signed cumulative gallery deltas (implements ``server.enrollment.sync.GallerySync``) and
    is an :class:`server.bundles.offers.Offer`: the latest delta is offered again to doors that lack it.

    With a ``keyring`` (the default of the server: ``[bundles] encrypt_gallery``) every delta is sealed
    under the site's current gallery key and carries its wraps to the trusted doors; without one
    (explicitly unencrypted) names and templates cross the broker in plaintext.
    """

    name = "gallery delta"

    def __init__(self, client: MqttClient, topics: Topics, root: Path, key: Ed25519PrivateKey,
                 keyring: SiteKeyring | None = None, cipher: ChipCipher | None = None) -> None:
        self.client = client
        self.topics = topics
        self.key = key
        self.keyring = keyring
        self.root = Path(root)
        self.cipher = cipher
        self.ledger = DeltaLedger(root, cipher)
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def _shared(self) -> Iterator[DeltaLedger]:
        """The ledger as on disk now, held against this process's threads and other replicas."""
        with self._lock, exclusive_lock(self.root / LOCK_FILE):
            self.ledger = DeltaLedger(self.root, self.cipher)
            yield self.ledger

    def _publish(self, wait: bool = True) -> int:
        try:
            sealer = self.keyring.sealer() if self.keyring is not None else None
        except SiteKeyError as exc:  # never fall back to plaintext
            raise SyncError(f"gallery delta not published: {exc}") from exc
        delta = self.ledger.delta(self.key, sealer)
        handle = self.client.publish(self.topics.gallery_delta, delta.to_bytes(), qos=1, retain=True)
        if not handle.queued:
            raise SyncError(f"gallery delta {delta.seq} could not be queued for the broker")
        if wait and self.client.connected:  # pacing only: paho keeps it queued, and it is offered again
            handle.wait_for_publish(PUBLISH_WAIT_S)
        logger.info("gallery delta %d published (+%d persons, %d tombstones)", delta.seq, len(delta.add),
                    len(delta.remove))
        return delta.seq

    def publish_add(self, model_sha256: str, entries: list[GalleryEntry]) -> int | None:
        """Add templates on every device."""
        if not entries:
            return None
        with self._shared() as ledger:
            ledger.add(model_sha256 or NO_MODEL, entries)
            return self._publish()

    def publish_remove(self, model_sha256: str, person_id: str, template_ids: list[str]) -> int | None:
        """Remove a person (all templates) on every device; each device acks the returned sequence."""
        with self._shared() as ledger:
            ledger.remove(person_id)
            return self._publish()

    def rebase(self, bundle_sequence: int, coverage: Sequence[GalleryCoverage]) -> int | None:
        """Drop the adds every covering gallery holds and publish the smaller delta; None if unchanged."""
        with self._shared() as ledger:
            if ledger.rebase(bundle_sequence, coverage) is None:
                return None
            return self._publish()

    def observe_doors(self, door_keys: dict[str, str]) -> int | None:
        """Record doors' reported public keys; publish the delta again when a door became trusted (so it
        gets its wrap at once); return that delta's sequence, or None."""
        if self.keyring is None:
            return None
        new = [device for device, public in sorted(door_keys.items()) if self.keyring.observe(device, public)]
        if not new:
            return None
        with self._shared():
            return self._publish(wait=False)

    def revoke_door(self, device: str) -> tuple[int, int]:
        """Revoke ``device``'s key and publish the delta under a new gallery key wrapped only to the
        remaining doors; return (gallery key version, delta sequence)."""
        if self.keyring is None:
            raise SyncError("gallery encryption is off ([bundles] encrypt_gallery = false): no key to "
                            "rotate")
        with self._shared() as ledger:
            version = self.keyring.revoke(device)
            ledger.seq += 1  # a new sequence: doors that applied the old one take the new one
            ledger.save()
            return version, self._publish()

    def approve_door(self, device: str) -> int:
        """Trust the key ``device`` reported last and publish the delta with its wrap; return the sequence."""
        if self.keyring is None:
            raise SyncError("gallery encryption is off ([bundles] encrypt_gallery = false): no key to wrap")
        with self._shared():
            self.keyring.approve(device)
            return self._publish(wait=False)

    def republish(self) -> int | None:
        """Publish the current ledger again (e.g. after the broker lost its retained messages)."""
        with self._shared() as ledger:
            return self._publish(wait=False) if ledger.seq else None

    def offer(self) -> bool:
        """Offer the latest delta again (``server.bundles.offers``); False when there is none yet."""
        return self.republish() is not None

    def behind(self, ack: BundleAck) -> bool:
        """True when the door that sent ``ack`` processed an older delta than the latest."""
        return ack.delta_sequence < self.ledger.seq

    def close(self) -> None:
        """Nothing to release: the MQTT client belongs to the caller."""
