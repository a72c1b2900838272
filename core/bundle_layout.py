"""The bundle folder layout the server builds and the doors install (one definition for both sides).

    <bundle>/bundle.json        the signed announce (``core.protocol.schemas.BundleAnnounce``)
    <bundle>/models/            manifest.json + the model files
    <bundle>/gallery/           gallery.json + vectors (+ index)
"""

from __future__ import annotations

BUNDLE_JSON = "bundle.json"  # the announce, signed
MODELS_DIR = "models"  # the models folder inside a bundle
GALLERY_DIR = "gallery"  # the gallery folder inside a bundle
META_NAME = "gallery.json"  # a gallery folder's metadata file
