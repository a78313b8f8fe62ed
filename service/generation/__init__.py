"""Generation: /generate, the OpenAI-compatible images API, and stored images."""
