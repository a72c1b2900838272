"""Neural style transfer (Gatys et al.) as a job service with pluggable backbones."""
