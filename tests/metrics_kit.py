"""Reading Prometheus samples in tests."""

from __future__ import annotations

from prometheus_client.metrics_core import Metric


def value(families: dict[str, Metric], name: str, sample: str | None = None, **labels: str) -> float:
    """The one sample ``sample`` (default: the family name) with ``labels`` in family ``name``."""
    wanted = sample or name
    found = [s.value for s in families[name].samples
             if s.name == wanted and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (wanted, labels, families[name].samples)
    return float(found[0])
