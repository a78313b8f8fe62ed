"""lorastack: train LoRA adapters and serve them over HTTP.

``lorastack.cli`` is the command line (the composition root of the service and its workers).
"""
