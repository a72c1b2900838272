"""The fine-tuned passive head: MiniFASNet's pooled features, scored by a head trained on the server.

``facegate train liveness`` fits a logistic head on MiniFASNet-2.7's pooled (GDC) features over several
labelled datasets; the registry's gate promotes it only when it beats the shipped MiniFASNet scorer on
held-out data, and the bundle then ships two manifest entries (role ``liveness``):

- ``liveness-features``: MiniFASNet-2.7 with its pooled features as a second output
  (``models.convert.liveness_features``), ``extra["scale"]`` its patch scale;
- ``liveness-head``: ``(1, C)`` features -> ``(1, 1)`` genuine probability. Its logit is mapped at export
  so that the config's ``[liveness.passive] threshold`` and ``uncertain_band`` are its calibrated
  operating point: swapping the head in never needs a config change.

The features are those of the patch and its mirror image, averaged, cut from the same face box as the
MiniFASNet check (``passive.face_box``). Training extracts them with :class:`FeatureModel`, the class
the door runs, so the two cannot drift apart.
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType

import numpy as np
import numpy.typing as npt

from core.types import Detection, ImageArray
from device.liveness.passive import PassiveModelError, crop_patch, face_box
from models.runtime.interpreter import TFLiteModel
from models.runtime.manifest import ManifestError, load_manifest, verify_entry

FEATURES_ENTRY = "liveness-features"
HEAD_ENTRY = "liveness-head"
DEFAULT_SCALE = 2.7


class FeatureModel:
    """A MiniFASNet whose second output is its pooled features; ``features(rgb, det)`` gives ``(C,)``."""

    def __init__(self, path: Path, scale: float = DEFAULT_SCALE, threads: int = 1) -> None:
        self.model = TFLiteModel(path, threads=threads)
        self.scale = scale
        if len(self.model.outputs) != 2 or self.model.input.shape[1:3] != (80, 80):
            self.model.close()
            raise PassiveModelError(f"{Path(path).name} is not a MiniFASNet with a features output "
                                    "(80x80 input, logits and features outputs)")
        self.width = int(np.prod(self.model.outputs[1].shape))

    def features(self, rgb: ImageArray, det: Detection) -> npt.NDArray[np.float32]:
        """Pooled features of the face ``det`` in an RGB frame: the mean over the patch and its mirror."""
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        patch = crop_patch(bgr, face_box(det), self.scale)
        total = np.zeros(self.width, np.float32)
        for view in (patch, np.ascontiguousarray(patch[:, ::-1])):
            total += self.model.run_all(view[None])[1].reshape(-1)
        out: npt.NDArray[np.float32] = total / 2.0
        return out

    def close(self) -> None:
        """Release the interpreter (safe to call twice)."""
        self.model.close()


class TrainedHead:
    """Features model plus trained head; ``score(rgb, det)`` is the genuine probability in [0, 1]."""

    def __init__(self, features_path: Path, head_path: Path, scale: float = DEFAULT_SCALE,
                 threads: int = 1) -> None:
        self.feature_model = FeatureModel(features_path, scale, threads)
        try:
            self.head = TFLiteModel(head_path, threads=1)
            if self.head.input.shape != (1, self.feature_model.width):
                raise PassiveModelError(f"{Path(head_path).name} takes {self.head.input.shape}; the features "
                                        f"model gives {self.feature_model.width} numbers")
        except BaseException:
            self.feature_model.close()
            raise

    def score_features(self, features: npt.NDArray[np.float32]) -> float:
        """The head's genuine probability for precomputed features."""
        return float(self.head.run(np.asarray(features, np.float32).reshape(1, -1)).reshape(-1)[0])

    def score(self, rgb: ImageArray, det: Detection) -> float:
        """Genuine probability of the face ``det`` in an RGB frame."""
        return self.score_features(self.feature_model.features(rgb, det))

    def close(self) -> None:
        """Release both interpreters (safe to call twice)."""
        self.feature_model.close()
        self.head.close()

    def __enter__(self) -> TrainedHead:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def trained_head_files(models_dir: Path) -> tuple[Path, Path, float] | None:
    """(features file, head file, patch scale) when the manifest ships a trained head, else None.

    Both entries are sha256-verified; one without the other, or a damaged file, is an error (a bundle
    that promised a head must not silently fall back)."""
    try:
        manifest = load_manifest(Path(models_dir))
    except ManifestError:
        return None
    has_features, has_head = manifest.has(FEATURES_ENTRY), manifest.has(HEAD_ENTRY)
    if not has_features and not has_head:
        return None
    if not (has_features and has_head):
        raise PassiveModelError(f"{models_dir}: the manifest lists only one of {FEATURES_ENTRY} and "
                                f"{HEAD_ENTRY}")
    try:
        features_entry = manifest.get(FEATURES_ENTRY)
        features = verify_entry(Path(models_dir), features_entry)
        head = verify_entry(Path(models_dir), manifest.get(HEAD_ENTRY))
        scale = float(features_entry.extra.get("scale", DEFAULT_SCALE))
    except (ManifestError, ValueError) as exc:
        raise PassiveModelError(f"trained liveness head in {models_dir} unusable: {exc}") from exc
    return features, head, scale
