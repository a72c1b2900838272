"""The fleet brain: enrollment station, audit log, API and web UI, training, evaluation, bundles.

May import ``device`` and ``models``; nothing imports ``server``.
"""
