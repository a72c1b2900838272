"""Light inference runtime: load and run ``.tflite`` files with LiteRT, read manifests. numpy only."""
