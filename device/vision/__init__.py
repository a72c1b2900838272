"""Vision: image validation, BlazeFace detection, face mesh, alignment, the embedder and the pipeline."""
