"""lorastack API service: FastAPI app, settings, SQL models, artifact store and domains."""

__version__ = "0.1.0"
