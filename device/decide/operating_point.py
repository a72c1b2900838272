"""The door's calibrated operating point: the decision threshold for the job a door does.

A door searches one face against everyone enrolled (1:N, open set), so the threshold that keeps
strangers out depends on how many people are enrolled: the more templates, the more chances a
stranger has to land above ``tau`` by accident. The config's default ``tau``/``delta`` and the floor
that a configured ``tau`` may not go under (without an explicit acknowledgement) both come from here.

The rows were measured by::

    facegate eval calibrate --open-set --identities ../shared/data/celeba-faces --exclude 7393 \\
        --fpir 1e-3 --draws 20 --json

int8 embedder with flip fusion, one photo per person (one-shot), a single frame per decision, target
FPIR 1e-3 (``server.evaluation.openset``): 199 CelebA identities (7393 is 7392 under a second id),
synthetic distractors beyond the real enrolled persons, tau kept within the target for 90% of
identity-bootstrap resamples of the strangers. ``fpir``/``fnir`` are the *held-out* estimates (rule
chosen on one half of the identities, measured on the other, both ways, averaged). Held-out FPIR
lands at 1-2.2e-3, not 1e-3: a few look-alike strangers of one half are not foreseen by the other.
FNIR is high because these are uploaded celebrity photos (years, make-up, pose and camera between
the enrollment photo and the probe), where the dlib ResNet itself reaches its limit; see the README.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class OperatingPoint:
    """One calibrated row: threshold and margin for galleries up to ``max_gallery_size`` persons.

    ``fpir`` and ``fnir`` are the held-out single-frame rates measured with the row (None: not measured).
    """

    max_gallery_size: int
    tau: float
    delta: float
    fpir: float | None = None
    fnir: float | None = None


# Sorted by max_gallery_size; the last row covers every larger gallery.
CALIBRATED: tuple[OperatingPoint, ...] = (
    OperatingPoint(max_gallery_size=10, tau=0.9465, delta=0.0, fpir=0.00094, fnir=0.507),
    OperatingPoint(max_gallery_size=100, tau=0.9427, delta=0.05, fpir=0.00221, fnir=0.577),
    OperatingPoint(max_gallery_size=1_000, tau=0.9477, delta=0.035, fpir=0.00166, fnir=0.575),
    OperatingPoint(max_gallery_size=10_000, tau=0.9543, delta=0.025, fpir=0.00156, fnir=0.644),
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
