"""Celery workers: thin tasks around the torch engine."""
