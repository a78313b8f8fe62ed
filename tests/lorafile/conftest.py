"""Fixtures of the LoRA-file tests: real LoRA files made on the tiny pipeline."""

from tests.fixtures.lora_sources import base_pipe, load_output, source_lora, tiny_base_dir

__all__ = ["base_pipe", "load_output", "source_lora", "tiny_base_dir"]
