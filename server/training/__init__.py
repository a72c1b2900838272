"""Server-side training (TensorFlow): triplet loss and mining, student distillation, the pairs head.

Most modules here import TensorFlow/Keras; the light registry, gate, model folders and promotion live in
``server.registry``. The device never imports this package.
"""
