"""The one per-frame pipeline: detect -> align -> liveness -> embed -> search -> decide (``frame``)."""
