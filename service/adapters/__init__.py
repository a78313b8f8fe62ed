"""LoRA adapter files: capped safetensors parsing, format conversion and the import lint."""
