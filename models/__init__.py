"""The networks' life cycle: a light runtime (``models.runtime``) and a heavy builder (``models.convert``)."""
