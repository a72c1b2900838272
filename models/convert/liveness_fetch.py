"""``facegate models fetch-liveness``: the Apache-2.0 MiniFASNet files for passive liveness, sha256-pinned.

The files are not on PyPI. For a user's machine they are downloaded from their upstream repositories
(Minivision's licence, feni-katharotiya's float32 TFLite conversions of Minivision's weights), each
checked against the sha256 pinned here before it is used; ``--from DIR`` takes them from a folder
instead (offline installs, ``../shared``) and checks the same sha256s. The verified folder then goes
through ``facegate models build --minifasnet DIR``, which adds ``minifasnet-2.7`` and ``minifasnet-4.0``
to the models manifest. This runs only when a person asks for it: nothing downloads at run time.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from core.files import atomic_write_bytes, sha256_file

logger = logging.getLogger(__name__)

# A download larger than this is not one of ours (the files are ~1.8 MB); it is cut off, not stored.
MAX_BYTES = 16 << 20
# Seconds a stalled connection is given before the download fails.
TIMEOUT_S = 60.0
_TFLITE = "https://github.com/feni-katharotiya/Silent-Face-Anti-Spoofing-TFLite/raw/a89a24b62078"
_MINIVISION = "https://github.com/minivision-ai/Silent-Face-Anti-Spoofing/raw/b6d5f04ad787"


class FetchError(Exception):
    """A MiniFASNet file is missing, could not be downloaded, or does not match its pinned sha256."""


@dataclass(frozen=True, slots=True)
class PinnedFile:
    """One upstream file: its name, where it comes from, and the only sha256 accepted."""

    name: str
    url: str
    sha256: str


PINNED: tuple[PinnedFile, ...] = (
    PinnedFile("2.7_80x80_MiniFASNetV2_float32.tflite",
               f"{_TFLITE}/converted_models/tf_model/model_tf_2.7/2.7_80x80_MiniFASNetV2_float32.tflite",
               "9c7d626485a3c2b1106a94b7c8f56e7e8fea5d75ef2a789c82a89c27fa026fb3"),
    PinnedFile("4_0_0_80x80_MiniFASNetV1SE_float32.tflite",
               f"{_TFLITE}/converted_models/tf_model/model_tf_4.0/4_0_0_80x80_MiniFASNetV1SE_float32.tflite",
               "bfa2b022cbc9a7d2bed85708ba54e318e0fc6cafdd10a2f076a0dc80e3521091"),
    PinnedFile("LICENSE", f"{_MINIVISION}/LICENSE",
               "daf94bf1dc9cc5700fe5af2c7c0cbd1836e70d509ed78fd0bebef7432edee6fb"),
)


def _check(path: Path, pinned: PinnedFile) -> None:
    if not path.is_file():
        raise FetchError(f"{path} is missing")
    digest = sha256_file(path)
    if digest != pinned.sha256:
        raise FetchError(f"{path} has sha256 {digest}, expected {pinned.sha256}: not the pinned file")


def _download(pinned: PinnedFile, dest: Path) -> None:
    """Fetch one file into memory (bounded), check its sha256, then write it atomically."""
    if not pinned.url.startswith("https://"):
        raise FetchError(f"refusing a non-https source for {pinned.name}")
    logger.info("downloading %s", pinned.url)
    try:
        with urllib.request.urlopen(pinned.url, timeout=TIMEOUT_S) as response:  # noqa: S310 - https only
            data = response.read(MAX_BYTES + 1)
    except OSError as exc:
        raise FetchError(f"cannot download {pinned.url}: {exc}; copy the files by hand and use "
                         "--from DIR") from exc
    if len(data) > MAX_BYTES:
        raise FetchError(f"{pinned.url} is larger than {MAX_BYTES} bytes: not the pinned file")
    digest = hashlib.sha256(data).hexdigest()
    if digest != pinned.sha256:
        raise FetchError(f"{pinned.url} has sha256 {digest}, expected {pinned.sha256}: refused")
    atomic_write_bytes(dest, data)


def fetch_minifasnet(dest: Path, source: Path | None = None) -> list[Path]:
    """Put every pinned file into ``dest``, verified: copied from ``source`` when given, else downloaded.

    Files already in ``dest`` with the right sha256 are kept; anything that does not match is refused
    with FetchError and nothing unverified is left in ``dest``.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for pinned in PINNED:
        target = dest / pinned.name
        if source is not None:
            _check(Path(source) / pinned.name, pinned)
            if Path(source).resolve() != dest.resolve():
                tmp = target.with_name(f".{target.name}.part")
                shutil.copyfile(Path(source) / pinned.name, tmp)
                tmp.replace(target)
        elif not (target.is_file() and sha256_file(target) == pinned.sha256):
            _download(pinned, target)
        _check(target, pinned)
        out.append(target)
    return out
