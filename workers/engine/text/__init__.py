"""Text classification: tiny base models, LoRA and full fine-tuning, mixed-adapter inference."""
