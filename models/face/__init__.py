"""The face models' geometry, below both the converter and the doors: image validation, BlazeFace detection,
the face mesh and the 150x150 chip alignment (dlib's template). ``models.convert`` cuts its int8
calibration chips with these, and ``device.vision`` runs them at the door, so the two cannot differ.
Imports numpy, OpenCV, ``core`` and ``models.runtime`` only."""
