"""Module naming shared by every format: components, kohya's flattened names, LDM UNet blocks.

Paths are module paths inside a component; text-encoder paths are relative to the CLIP text
model (no ``text_model.`` prefix), since transformers 5 flattens that level.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

UNET: Final = "unet"
TEXT_ENCODER: Final = "text_encoder"
TEXT_ENCODER_2: Final = "text_encoder_2"
COMPONENTS: Final = (UNET, TEXT_ENCODER, TEXT_ENCODER_2)

# Names with an underscore inside one module name; kohya joins every path level with "_", so
# these must be put back together when the path is split again.
_COMPOUND_NAMES: Final = (
    # diffusers UNet
    "down_blocks",
    "up_blocks",
    "mid_block",
    "transformer_blocks",
    "proj_in",
    "proj_out",
    "to_q",
    "to_k",
    "to_v",
    "to_out",
    "time_emb_proj",
    "conv_shortcut",
    "conv_in",
    "conv_out",
    "conv_norm_out",
    "time_embedding",
    "linear_1",
    "linear_2",
    "add_embedding",
    # CLIP text encoder
    "text_model",
    "self_attn",
    "q_proj",
    "k_proj",
    "v_proj",
    "out_proj",
    "final_layer_norm",
    "layer_norm1",
    "layer_norm2",
    "text_projection",
    "token_embedding",
    "position_embedding",
    # original (LDM) SD checkpoint UNet
    "input_blocks",
    "middle_block",
    "output_blocks",
    "in_layers",
    "emb_layers",
    "out_layers",
    "skip_connection",
    "time_embed",
)
_COMPOUNDS_BY_FIRST: Final[dict[str, list[tuple[str, ...]]]] = {}
for _name in sorted(_COMPOUND_NAMES, key=lambda n: -n.count("_")):
    _parts = tuple(_name.split("_"))
    _COMPOUNDS_BY_FIRST.setdefault(_parts[0], []).append(_parts)


def split_kohya_name(flat: str) -> str:
    """Turn a kohya module name (levels joined by ``_``) back into a dotted module path."""
    tokens = flat.split("_")
    parts: list[str] = []
    index = 0
    while index < len(tokens):
        for candidate in _COMPOUNDS_BY_FIRST.get(tokens[index], ()):
            if tuple(tokens[index : index + len(candidate)]) == candidate:
                parts.append("_".join(candidate))
                index += len(candidate)
                break
        else:
            parts.append(tokens[index])
            index += 1
    return ".".join(parts)


def strip_text_model(path: str) -> str:
    """A text-encoder module path without the CLIP ``text_model.`` level."""
    return path.removeprefix("text_model.")


def with_text_model(component: str, path: str) -> str:
    """The path as diffusers names it in a file: text-encoder paths under ``text_model.``."""
    return path if component == UNET else f"text_model.{path}"


# --- kohya original-checkpoint (LDM) UNet naming ---------------------------------------------

_LDM_TOP_LEVEL: Final[Mapping[str, str]] = {
    "input_blocks.0.0": "conv_in",
    "out.2": "conv_out",
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
}
_LDM_INNER_RENAMES: Final[Mapping[str, Mapping[str, str]]] = {
    "resnet": {
        "in_layers.2": "conv1",
        "emb_layers.1": "time_emb_proj",
        "out_layers.3": "conv2",
        "skip_connection": "conv_shortcut",
    },
    "downsampler": {"op": "conv"},
    "upsampler": {"conv": "conv"},
    "attention": {},
}


def ldm_block_map(unet_config: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """Map original-checkpoint UNet blocks (``input_blocks.1.1``) to diffusers ones.

    Values are (diffusers prefix, kind); the layout follows the UNet config's block types and
    layers_per_block, as the original SD checkpoint numbered its blocks.
    """
    layers = unet_config.get("layers_per_block")
    down_types = unet_config.get("down_block_types")
    up_types = unet_config.get("up_block_types")
    if not isinstance(layers, int) or isinstance(layers, bool) or layers < 1:
        raise ValueError("UNet config needs a positive int layers_per_block")
    if not isinstance(down_types, list | tuple) or not isinstance(up_types, list | tuple):
        raise ValueError("UNet config needs down_block_types and up_block_types")
    mapping: dict[str, tuple[str, str]] = {}
    index = 1
    for block, block_type in enumerate(down_types):
        for layer in range(layers):
            mapping[f"input_blocks.{index}.0"] = (f"down_blocks.{block}.resnets.{layer}", "resnet")
            if "CrossAttn" in str(block_type):
                mapping[f"input_blocks.{index}.1"] = (
                    f"down_blocks.{block}.attentions.{layer}",
                    "attention",
                )
            index += 1
        if block < len(down_types) - 1:
            mapping[f"input_blocks.{index}.0"] = (
                f"down_blocks.{block}.downsamplers.0",
                "downsampler",
            )
            index += 1
    mapping["middle_block.0"] = ("mid_block.resnets.0", "resnet")
    mapping["middle_block.1"] = ("mid_block.attentions.0", "attention")
    mapping["middle_block.2"] = ("mid_block.resnets.1", "resnet")
    index = 0
    for block, block_type in enumerate(up_types):
        has_attention = "CrossAttn" in str(block_type)
        for layer in range(layers + 1):
            mapping[f"output_blocks.{index}.0"] = (f"up_blocks.{block}.resnets.{layer}", "resnet")
            position = 1
            if has_attention:
                mapping[f"output_blocks.{index}.1"] = (
                    f"up_blocks.{block}.attentions.{layer}",
                    "attention",
                )
                position = 2
            if layer == layers and block < len(up_types) - 1:
                mapping[f"output_blocks.{index}.{position}"] = (
                    f"up_blocks.{block}.upsamplers.0",
                    "upsampler",
                )
            index += 1
    return mapping


def ldm_to_diffusers_path(path: str, block_map: Mapping[str, tuple[str, str]]) -> str:
    """Rename an LDM UNet module path; an unknown block is returned unchanged."""
    for ldm_name, diffusers_name in _LDM_TOP_LEVEL.items():
        if path == ldm_name:
            return diffusers_name
    parts = path.split(".")
    depth = 2 if parts[0] == "middle_block" else 3
    block = ".".join(parts[:depth])
    inner = ".".join(parts[depth:])
    if block not in block_map or not inner:
        return path
    prefix, kind = block_map[block]
    for old, new in _LDM_INNER_RENAMES[kind].items():
        if inner == old or inner.startswith(old + "."):
            inner = new + inner[len(old) :]
            break
    return f"{prefix}.{inner}"


def is_ldm_unet_name(flat: str) -> bool:
    return flat.startswith(
        ("input_blocks_", "middle_block_", "output_blocks_", "out_2", "time_embed_")
    )


# Generic leaf names that say little alone; the short module name keeps walking up past them.
_GENERIC_LEAVES: Final = frozenset({"proj", "net", "conv"})


def short_module_name(path: str) -> str:
    """peft-style target name of a module path (``to_out.0``, ``q_proj``, ``ff.net.0.proj``)."""
    parts = path.split(".")
    taken: list[str] = []
    for part in reversed(parts):
        taken.append(part)
        if not part.isdigit() and part not in _GENERIC_LEAVES:
            break
    return ".".join(reversed(taken))
