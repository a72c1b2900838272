"""The bundle folder layout the server builds and the doors install (one definition for both sides).

    <bundle>/bundle.json        the signed announce (``core.protocol.schemas.BundleAnnounce``)
    <bundle>/models/            manifest.json + the model files
    <bundle>/gallery/           gallery.json + vectors (+ index), each AES-GCM sealed when the
                                manifest names a ``gallery_key_version``
    <bundle>/gallery-open/      (door only, not in the manifest) the opened gallery of a sealed bundle
"""

from __future__ import annotations

BUNDLE_JSON = "bundle.json"  # the announce, signed
MODELS_DIR = "models"  # the models folder inside a bundle
GALLERY_DIR = "gallery"  # the gallery folder inside a bundle
META_NAME = "gallery.json"  # a gallery folder's metadata file
OPEN_GALLERY_DIR = "gallery-open"  # a door's opened copy of a sealed gallery (never in a manifest)
