"""Indexes for the event list filtered by decision kind, and for a device's pending deletions.

Revision ID: 0002
Revises: 0001

- ``events``: the event list (``GET /api/events?kind=denied`` and the web page's kind filter) selects
  one decision kind and orders by ``ts`` newest first. The baseline had only ``ix_events_kind`` (kind
  alone), so each such page sorted every event of that kind; ``ix_events_kind_ts`` serves the filter
  and the order from one index and makes ``ix_events_kind`` redundant (a composite index's leading
  column serves kind-only lookups), so that one is dropped.
- ``deletion_devices``: every delta ack looks up the pending deletions of its device
  (``DeletionDevice.device_id IN (...)``); the baseline's only index there, ``uq_deletion_device``,
  leads with ``request_id``, so the lookup scanned the table. ``ix_deletion_devices_device_id`` is new.
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Add the two indexes and drop the one the composite replaces."""
    op.create_index("ix_events_kind_ts", "events", ["kind", "ts"])
    op.drop_index("ix_events_kind", table_name="events")
    op.create_index("ix_deletion_devices_device_id", "deletion_devices", ["device_id"])


def downgrade() -> None:
    """Back to the 0001 indexes."""
    op.drop_index("ix_deletion_devices_device_id", table_name="deletion_devices")
    op.create_index("ix_events_kind", "events", ["kind"])
    op.drop_index("ix_events_kind_ts", table_name="events")
