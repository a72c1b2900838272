"""`facegate eval liveness-planar`: the planar-attack geometry check on real frame sequences.

Frames of a labels CSV (``path,label,subject,session``) are grouped into tracks by label, subject, session
and, for NUAA-style names ``ID_glasses_position_session_picture.jpg``, glasses and position codes; inside a
track frames are ordered by picture number. Each frame goes through BlazeFace and the face mesh, the
mesh subset feeds a ``PlanarTrack``, and the track's score (median planar residual over frames with
enough motion) is compared between genuine and attack tracks: per-track score distributions, the AUC and
the error rates at the configured threshold. Printed as one JSON object with ``--json``.

NUAA's frames are subsampled from the videos (not consecutive), and its attacks include bent prints,
which are not planar: treat the figures as a sanity check, not a calibration.
"""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import click
import numpy as np

from server.evaluation.liveness import LabelRow, LivenessEvalError, detector_path, load_labels

logger = logging.getLogger(__name__)

NUAA_NAME = re.compile(r"^(?P<id>\d+)_(?P<glasses>\d+)_(?P<pos>\d+)_(?P<session>\d+)_(?P<pic>\d+)$")


def track_key(row: LabelRow) -> tuple[tuple[str, ...], int]:
    """(track key, order inside the track) for a labelled frame."""
    match = NUAA_NAME.match(Path(row.path).stem)
    label = "genuine" if row.genuine else "attack"
    if match is None:
        return (label, row.subject, row.session), 0
    return (label, row.subject, row.session, match["glasses"], match["pos"]), int(match["pic"])


def run_planar_eval(labels_csv: Path, models_dir: Path | None = None, threshold: float | None = None,
                    min_motion: float | None = None) -> dict[str, Any]:
    """Per-track planar scores of genuine and attack sequences, AUC and rates at the threshold."""
    from device.config import DetectorConfig, LivenessConfig
    from device.liveness.fusion import planar_params
    from device.liveness.planar import PLANAR_MESH_INDICES, PlanarTrack
    from models.face.detector import BlazeFaceDetector
    from models.face.image import ImageError, decode_image
    from models.face.mesh import MeshMeasurer, mesh_model_path

    defaults = LivenessConfig()
    config = defaults.model_copy(update={"planar": defaults.planar.model_copy(update={
        "threshold": defaults.planar.threshold if threshold is None else threshold,
        "min_motion": defaults.planar.min_motion if min_motion is None else min_motion})})
    params = planar_params(config)
    tracks: dict[tuple[str, ...], list[tuple[int, LabelRow]]] = defaultdict(list)
    for row in load_labels(labels_csv):
        key, order = track_key(row)
        tracks[key].append((order, row))
    scores: dict[str, list[float]] = {"genuine": [], "attack": []}
    too_little = {"genuine": 0, "attack": 0}
    with BlazeFaceDetector(detector_path(models_dir, "short"), "short", DetectorConfig()) as detector, \
            MeshMeasurer(mesh_model_path(models_dir, config.mesh_model)) as mesh:
        for key, frames in sorted(tracks.items()):
            track = PlanarTrack(params)
            for _, row in sorted(frames, key=lambda item: item[0]):
                path = labels_csv.parent / row.path
                try:
                    rgb = decode_image(path.read_bytes())
                except (OSError, ImageError) as exc:
                    raise LivenessEvalError(f"cannot read {path}: {exc}") from exc
                faces = detector.detect(rgb)
                observed = mesh.observe(rgb, faces[0]) if faces else None
                if observed is not None:
                    track.add(observed[0].points[list(PLANAR_MESH_INDICES), :2])
            value, evidence = track.score()
            if value is None or evidence < params.min_frames:
                too_little[key[0]] += 1
            else:
                scores[key[0]].append(value)
    gen, att = np.array(scores["genuine"]), np.array(scores["attack"])
    auc = float(np.mean((gen[:, None] > att[None, :]) + 0.5 * (gen[:, None] == att[None, :]))) \
        if gen.size and att.size else None
    pct = (0, 25, 50, 75, 100)
    return {
        "threshold": params.threshold,
        "min_motion": params.min_motion,
        "tracks_genuine": gen.size,
        "tracks_attack": att.size,
        "too_little_motion": too_little,
        "genuine_score_pct": [round(float(v), 4) for v in np.percentile(gen, pct)] if gen.size else None,
        "attack_score_pct": [round(float(v), 4) for v in np.percentile(att, pct)] if att.size else None,
        "auc": None if auc is None else round(auc, 4),
        "attack_accepted": round(float((att >= params.threshold).mean()), 4) if att.size else None,
        "genuine_rejected": round(float((gen < params.threshold).mean()), 4) if gen.size else None,
    }


@click.command("liveness-planar")
@click.option("--labels", "labels_csv", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              required=True, help="CSV path,label,subject,session (genuine|attack; relative paths).")
@click.option("--models", "models_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Built models folder (BlazeFace, face mesh); default: the packaged files.")
@click.option("--threshold", type=click.FloatRange(min=0), default=None,
              help="Planar residual threshold (default: LivenessConfig.planar_threshold).")
@click.option("--min-motion", type=click.FloatRange(min=0), default=None,
              help="Motion a frame needs to count (default: LivenessConfig.planar_min_motion).")
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON object on stdout.")
def liveness_planar(labels_csv: Path, models_dir: Path | None, threshold: float | None,
                    min_motion: float | None, as_json: bool) -> None:
    """Planar-attack geometry on real frame sequences: per-track scores, AUC, rates at the threshold."""
    from models.face.mesh import MeshUnavailableError
    from models.runtime.assets import AssetNotFoundError
    from models.runtime.manifest import ManifestError

    try:
        result = run_planar_eval(labels_csv, models_dir, threshold, min_motion)
    except (LivenessEvalError, MeshUnavailableError, ManifestError, AssetNotFoundError) as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(result))
        return
    for key, value in result.items():
        click.echo(f"{key}: {value}")
