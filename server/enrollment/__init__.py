"""Enrollment: the shared face pipeline, quality gates, duplicate and consistency checks, deletions."""
