"""Liveness: passive CNN, active challenge, planar-attack geometry, fused by a policy."""
