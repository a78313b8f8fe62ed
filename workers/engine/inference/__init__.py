"""Inference: one shared Stable Diffusion pipeline with LoRA adapters hot-swapped in slots.

- ``lora_file``: a LoRA file parsed by ``lorafile`` -> ``LoraAdapterWeights`` (torch tensors).
- ``slots``: ``LoraSlotPool``, the fixed pool of peft LoRA slots and the constant-time switch.
- ``cache``: ``AdapterCache``, disk -> CPU -> device tiers with LRU eviction and pinning.
- ``schedulers``: schedulers by name from the base scheduler config.
- ``generation``: ``InferenceEngine``, ``GenerationRequest`` and ``GenerationResult``.
"""

from workers.engine.inference.cache import AdapterCache, AdapterSource, CacheSnapshot
from workers.engine.inference.generation import (
    AdapterRef,
    GenerationRequest,
    GenerationResult,
    GenerationTimings,
    InferenceEngine,
)
from workers.engine.inference.lora_file import (
    AdapterFormatError,
    LoraAdapterWeights,
    LoraModuleWeights,
    load_lora_file,
)
from workers.engine.inference.schedulers import SCHEDULER_NAMES, make_scheduler
from workers.engine.inference.slots import (
    DEFAULT_TARGET_MODULES,
    LoraSlotPool,
    ResidentAdapter,
)

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "SCHEDULER_NAMES",
    "AdapterCache",
    "AdapterFormatError",
    "AdapterRef",
    "AdapterSource",
    "CacheSnapshot",
    "GenerationRequest",
    "GenerationResult",
    "GenerationTimings",
    "InferenceEngine",
    "LoraAdapterWeights",
    "LoraModuleWeights",
    "LoraSlotPool",
    "ResidentAdapter",
    "load_lora_file",
    "make_scheduler",
]
