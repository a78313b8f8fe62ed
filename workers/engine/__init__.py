"""The torch + diffusers + peft engine.

Nothing in this package imports Celery, FastAPI, SQLAlchemy or the service package: it is
plain model code, unit-testable on its own.
"""
