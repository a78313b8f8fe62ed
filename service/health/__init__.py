"""Liveness, readiness and the live worker list."""
