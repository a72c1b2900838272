"""The door's calibrated operating point: the decision threshold for the job a door does.

A door searches one face against everyone enrolled (1:N, open set), so the threshold that keeps
strangers out depends on how many people are enrolled: the more templates, the more chances a
stranger has to land above ``tau`` by accident. ``facegate eval calibrate --open-set`` measures the
table below on held-out identities; the config's default ``tau``/``delta`` and the floor that a
configured ``tau`` may not go under (without an explicit acknowledgement) both come from here.

PLACEHOLDER: the rows below are the previous 1:1 calibration (tau 0.92 at FAR 1e-3, delta 0.05)
repeated for every gallery size until the open-set calibration replaces them with measured rows.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class OperatingPoint:
    """One calibrated row: the threshold and margin for galleries up to ``max_gallery_size`` persons."""

    max_gallery_size: int
    tau: float
    delta: float


# Sorted by max_gallery_size; the last row covers every larger gallery.
CALIBRATED: tuple[OperatingPoint, ...] = (
    OperatingPoint(max_gallery_size=10, tau=0.92, delta=0.05),
    OperatingPoint(max_gallery_size=100, tau=0.92, delta=0.05),
    OperatingPoint(max_gallery_size=1_000, tau=0.92, delta=0.05),
    OperatingPoint(max_gallery_size=10_000, tau=0.92, delta=0.05),
)

# What a config that leaves `tau`/`delta` out gets: the row for the largest gallery (the safe side).
DEFAULT_TAU = CALIBRATED[-1].tau
DEFAULT_DELTA = CALIBRATED[-1].delta


def operating_point(gallery_size: int) -> OperatingPoint:
    """The calibrated row for a gallery of ``gallery_size`` persons."""
    for row in CALIBRATED:
        if gallery_size <= row.max_gallery_size:
            return row
    return CALIBRATED[-1]


def tau_floor(gallery_size: int) -> float:
    """The lowest ``tau`` a door with ``gallery_size`` persons may run without an acknowledgement."""
    return operating_point(gallery_size).tau


def lowest_tau_floor() -> float:
    """The floor of the smallest gallery: a ``tau`` under it is below the floor for every gallery size."""
    return min(row.tau for row in CALIBRATED)


def low_tau_warning(tau: float, gallery_size: int) -> str | None:
    """Why ``tau`` is unsafe for ``gallery_size`` persons (below the calibrated floor), else None."""
    floor = tau_floor(gallery_size)
    if tau >= floor:
        return None
    return (f"decision.tau {tau:g} is below the calibrated floor {floor:g} for a gallery of {gallery_size} "
            f"person(s): strangers may be granted")
