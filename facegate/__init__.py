"""facegate: the thin command-line shell over the `device`, `server` and `models` packages."""

__version__ = "0.1.0"
