"""Safetensors parsing caps and LoRA format conversion, checked against real diffusers loads."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import tracemalloc
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors.numpy import save as save_numpy
from safetensors.torch import save as save_torch

from lorafile import (
    FORMATS,
    LORASTACK_VERSION,
    WRITERS,
    AdapterErrorCode,
    InvalidAdapterFile,
    SafetensorsFile,
    SafetensorsLimits,
    canonicalize,
    describe,
    parse_adapter,
    read_base_model_layout,
    read_safetensors,
    to_kohya,
    write_adapter,
    write_safetensors,
)
from lorafile.formats.kohya import kohya_module_name
from lorafile.naming import ldm_block_map, split_kohya_name
from tests.fixtures.lora_sources import (
    TEXT_ALPHA,
    TEXT_RANK,
    TEXT_TARGETS,
    UNET_ALPHA,
    UNET_RANK,
    UNET_TARGETS,
    LoadOutput,
    Pipeline,
    SourceLora,
    fresh_pipeline,
    model_output,
    randomise_lora_b,
)
from workers.engine.model_builder import TEXT_ENCODER_CONFIGS, UNET_CONFIGS

REPO = Path(__file__).resolve().parents[2]
# Same weights, same scale: only float summation order may differ (up to ~2e-5 on the tiny
# UNet's outputs, whose attention sits in its deeper, 64-channel block).
ATOL = 5e-5


def assert_same_output(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=1e-5)


def as_numpy(tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in tensors.items()}


def raw_safetensors(header: Mapping[str, object], data: bytes = b"") -> bytes:
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + data


def hand_made_kohya(
    source: SourceLora, unet_module_name: Callable[[str], str] = lambda module: module
) -> dict[str, torch.Tensor]:
    """The source adapter renamed to kohya keys by hand, with per-module alpha tensors."""
    renamed: dict[str, torch.Tensor] = {}
    for key, value in source.tensors.items():
        component, rest = key.split(".", 1)
        module, role, _ = rest.rsplit(".", 2)
        if component == "unet":
            name = "lora_unet_" + unet_module_name(module).replace(".", "_")
            alpha = UNET_ALPHA
        else:
            name, alpha = "lora_te_text_model_" + module.replace(".", "_"), TEXT_ALPHA
        suffix = "lora_down.weight" if role == "lora_A" else "lora_up.weight"
        renamed[f"{name}.{suffix}"] = value
        renamed[f"{name}.alpha"] = torch.tensor(float(alpha))
    return renamed


# Original-checkpoint (LDM) names of the tiny UNet's blocks, written out by hand.
LDM_BLOCKS = {
    "down_blocks.0.resnets.0": "input_blocks.1.0",
    "down_blocks.1.resnets.0": "input_blocks.3.0",
    "down_blocks.1.attentions.0": "input_blocks.3.1",
    "mid_block.resnets.0": "middle_block.0",
    "mid_block.attentions.0": "middle_block.1",
    "mid_block.resnets.1": "middle_block.2",
    "up_blocks.0.resnets.0": "output_blocks.0.0",
    "up_blocks.0.attentions.0": "output_blocks.0.1",
    "up_blocks.0.resnets.1": "output_blocks.1.0",
    "up_blocks.0.attentions.1": "output_blocks.1.1",
    "up_blocks.1.resnets.0": "output_blocks.2.0",
    "up_blocks.1.resnets.1": "output_blocks.3.0",
}
LDM_RESNET_LAYERS = {"conv1": "in_layers.2", "time_emb_proj": "emb_layers.1"}


def ldm_module_name(module: str) -> str:
    for diffusers_block, ldm_block in LDM_BLOCKS.items():
        if module.startswith(diffusers_block + "."):
            inner = module[len(diffusers_block) + 1 :]
            return f"{ldm_block}.{LDM_RESNET_LAYERS.get(inner, inner)}"
    raise AssertionError(f"no LDM block for {module}")


# --- safetensors reading ---------------------------------------------------------------------


def test_reads_every_float_dtype_and_widens_bf16(tmp_path: Path) -> None:
    values = torch.linspace(-3, 3, 12).reshape(3, 4)
    tensors = {
        "f16": values.half(),
        "bf16": values.bfloat16(),
        "f32": values,
        "f64": values.double(),
    }
    path = tmp_path / "dtypes.safetensors"
    path.write_bytes(save_torch(tensors, metadata={"k": "v"}))

    for source in (path, path.read_bytes()):
        loaded = read_safetensors(source, limits=SafetensorsLimits())
        assert loaded.metadata == {"k": "v"}
        assert loaded.stored_dtypes == {"f16": "F16", "bf16": "BF16", "f32": "F32", "f64": "F64"}
        assert loaded.tensors["bf16"].dtype == np.float32
        np.testing.assert_array_equal(loaded.tensors["bf16"], tensors["bf16"].float().numpy())
        for name in ("f16", "f32", "f64"):
            np.testing.assert_array_equal(loaded.tensors[name], tensors[name].numpy())


def test_write_then_read_round_trips() -> None:
    tensors = {
        "a": np.arange(6, dtype=np.float32).reshape(2, 3),
        "alpha": np.asarray(2.0, dtype=np.float32),
    }
    written = write_safetensors(tensors, {"x": "1"})
    loaded = read_safetensors(written)
    assert loaded.metadata == {"x": "1"}
    np.testing.assert_array_equal(loaded.tensors["a"], tensors["a"])
    assert loaded.tensors["alpha"].shape == ()


def read_error(source: bytes | Path, limits: SafetensorsLimits | None = None) -> str:
    with pytest.raises(InvalidAdapterFile) as caught:
        read_safetensors(source, limits=limits or SafetensorsLimits())
    return caught.value.code


def test_truncated_file_is_refused(source_lora: SourceLora) -> None:
    data = source_lora.path.read_bytes()
    assert read_error(data[:-10]) == AdapterErrorCode.TRUNCATED
    assert read_error(data[:5]) == AdapterErrorCode.NOT_SAFETENSORS


def test_header_longer_than_file_is_refused(tmp_path: Path) -> None:
    data = struct.pack("<Q", 10_000) + b'{"a": {"dtype": "F32"'
    path = tmp_path / "short.safetensors"
    path.write_bytes(data)
    assert read_error(data) == AdapterErrorCode.HEADER_EXCEEDS_FILE
    assert read_error(path) == AdapterErrorCode.HEADER_EXCEEDS_FILE


def test_renamed_pickle_and_garbage_are_refused(tmp_path: Path) -> None:
    zipped, legacy = io.BytesIO(), io.BytesIO()
    torch.save({"w": torch.ones(3)}, zipped)
    torch.save({"w": torch.ones(3)}, legacy, _use_new_zipfile_serialization=False)
    for name, data in (("zip", zipped.getvalue()), ("pickle", legacy.getvalue())):
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(data)
        assert read_error(path) == AdapterErrorCode.NOT_SAFETENSORS
    garbage = np.random.default_rng(0).bytes(4096)
    assert read_error(garbage) == AdapterErrorCode.HEADER_EXCEEDS_FILE


def test_huge_tensor_count_is_refused_from_the_header() -> None:
    header = {
        f"t{i}": {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]}
        for i in range(100_000)
    }
    data = raw_safetensors(header)  # no tensor data at all: only the header is ever looked at
    assert read_error(data) == AdapterErrorCode.HEADER_TOO_LARGE
    roomy = SafetensorsLimits(max_header_bytes=64 << 20)
    assert read_error(data, roomy) == AdapterErrorCode.TOO_MANY_TENSORS


def test_non_float_dtype_is_refused() -> None:
    data = save_numpy({"w": np.zeros((2, 2), dtype=np.float32), "i": np.zeros(3, np.int32)})
    assert read_error(data) == AdapterErrorCode.UNSUPPORTED_DTYPE


def test_inconsistent_header_entries_are_refused() -> None:
    wrong_shape = raw_safetensors(
        {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 8]}}, bytes(8)
    )
    assert read_error(wrong_shape) == AdapterErrorCode.INVALID_TENSOR
    overlapping = raw_safetensors(
        {
            "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
        },
        bytes(12),
    )
    assert read_error(overlapping) == AdapterErrorCode.OVERLAPPING_TENSORS
    hole = raw_safetensors({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, bytes(8))
    assert read_error(hole) == AdapterErrorCode.INVALID_LAYOUT
    duplicate = struct.pack("<Q", 2 * 61) + (
        b'{"a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]},'
        b'"a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}'
    ).ljust(2 * 61)
    assert read_error(duplicate) == AdapterErrorCode.INVALID_HEADER


def test_header_checks_run_before_any_tensor_data_is_read(tmp_path: Path) -> None:
    """A 16 MiB tensor refused for its dtype allocates almost nothing; accepted, it costs 16 MiB."""
    elements = 4 << 20
    for dtype, name in (("I32", "int.safetensors"), ("F32", "float.safetensors")):
        header = {"w": {"dtype": dtype, "shape": [elements], "data_offsets": [0, 4 * elements]}}
        prefix = raw_safetensors(header)
        path = tmp_path / name
        with path.open("wb") as handle:
            handle.write(prefix)
            handle.truncate(len(prefix) + 4 * elements)  # sparse: no data written to disk

    tracemalloc.start()
    try:
        with pytest.raises(InvalidAdapterFile) as caught:
            read_safetensors(tmp_path / "int.safetensors")
        _, refused_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        read_safetensors(tmp_path / "float.safetensors")
        _, accepted_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert caught.value.code == AdapterErrorCode.UNSUPPORTED_DTYPE
    assert refused_peak < 1 << 20
    assert accepted_peak >= 16 << 20


# --- format detection and naming -------------------------------------------------------------


def test_kohya_names_split_back_to_every_base_module(tiny_base_dir: Path) -> None:
    layout = read_base_model_layout(tiny_base_dir)
    checked = 0
    for component, modules in layout.modules.items():
        for path in modules:
            flat = kohya_module_name(component, path).split("_", 2)[2]
            split = split_kohya_name(flat)
            assert split.removeprefix("text_model.") == path
            checked += 1
    assert checked == sum(len(m) for m in layout.modules.values()) > 90


def test_kohya_names_split_back_for_the_full_sd15_architecture() -> None:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**UNET_CONFIGS["sd15"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER_CONFIGS["sd15"]))
    layers = (torch.nn.Linear, torch.nn.Conv2d)
    models: tuple[tuple[str, Any], ...] = (
        ("unet", unet),
        ("text_encoder", text_encoder),
    )
    for component, model in models:
        paths = [name for name, module in model.named_modules() if isinstance(module, layers)]
        assert len(paths) >= 72
        for path in paths:
            flat = kohya_module_name(component, path).split("_", 2)[2]
            assert split_kohya_name(flat).removeprefix("text_model.") == path


def test_every_input_format_parses_to_the_same_modules(source_lora: SourceLora) -> None:
    source = SafetensorsFile(as_numpy(source_lora.tensors), {})
    reference = parse_adapter(read_safetensors(source_lora.path))
    assert reference.format == "diffusers"
    assert reference.alpha_source == "header_metadata"

    # diffusers' older key spellings (convert_state_dict_to_diffusers output)
    legacy = {
        k.replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up."): v
        for k, v in source.tensors.items()
    }
    peft_unet = {
        "base_model.model." + k.removeprefix("unet."): v
        for k, v in source.tensors.items()
        if k.startswith("unet.")
    }
    kohya = as_numpy(hand_made_kohya(source_lora))
    cases = {
        "diffusers": (legacy, "default_rank", None),
        "peft": (peft_unet, "default_rank", "unet."),
        "kohya": (kohya, "tensors", None),
    }
    for expected_format, (tensors, alpha_source, only) in cases.items():
        parsed = parse_adapter(SafetensorsFile(tensors, {}))
        assert parsed.format == expected_format
        assert parsed.alpha_source == alpha_source
        expected = {
            n: m for n, m in reference.modules.items() if only is None or n.startswith(only)
        }
        assert parsed.modules.keys() == expected.keys()
        for name, module in parsed.modules.items():
            np.testing.assert_array_equal(module.down, expected[name].down)
            np.testing.assert_array_equal(module.up, expected[name].up)
            if alpha_source == "tensors":
                assert module.alpha == expected[name].alpha
            else:
                assert module.alpha == module.rank
        if alpha_source == "default_rank":
            assert any("alpha = rank" in w for w in parsed.warnings)


def test_ldm_names_need_the_unet_config(source_lora: SourceLora) -> None:
    ldm = SafetensorsFile(as_numpy(hand_made_kohya(source_lora, ldm_module_name)), {})
    with pytest.raises(InvalidAdapterFile) as caught:
        parse_adapter(ldm)
    assert caught.value.code == AdapterErrorCode.NEEDS_UNET_CONFIG


# --- conversions loaded by diffusers ---------------------------------------------------------


def test_canonical_loads_with_plain_load_lora_weights(
    source_lora: SourceLora, tiny_base_dir: Path, load_output: LoadOutput
) -> None:
    tensors, metadata, report = canonicalize(source_lora.path, base_model_dir=tiny_base_dir)
    assert report.format == "diffusers"
    assert all(".lora_A.weight" in k or ".lora_B.weight" in k for k in tensors)
    assert metadata["lorastack_base_model"] == "tiny"
    assert "lorastack_version" in metadata

    canonical_output = load_output(tensors, metadata)
    assert_same_output(canonical_output, source_lora.lora_output)
    # The LoRA matters, and so does its alpha: without the header the scale would be 1.0.
    assert (source_lora.lora_output - source_lora.base_output).abs().max() > 100 * ATOL
    without_alpha = load_output(tensors, {})
    assert (without_alpha - source_lora.lora_output).abs().max() > 100 * ATOL


def test_canonical_to_kohya_and_back_keeps_tensors_and_alpha(
    source_lora: SourceLora, tiny_base_dir: Path
) -> None:
    tensors, metadata, _ = canonicalize(source_lora.path, base_model_dir=tiny_base_dir)
    kohya_tensors, kohya_metadata = to_kohya(SafetensorsFile(tensors, metadata))
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in kohya_tensors)
    assert kohya_metadata["ss_network_alpha"] == str(UNET_ALPHA)
    assert kohya_metadata["lorastack_base_model"] == "tiny"
    alphas = {k: float(v) for k, v in kohya_tensors.items() if k.endswith(".alpha")}
    assert set(alphas.values()) == {UNET_ALPHA, TEXT_ALPHA}

    again, again_metadata, report = canonicalize(
        write_safetensors(kohya_tensors, kohya_metadata), base_model_dir=tiny_base_dir
    )
    assert report.format == "kohya"
    assert report.alpha_source == "tensors"
    assert again.keys() == tensors.keys()
    for key, value in tensors.items():
        assert again[key].dtype == value.dtype
        np.testing.assert_array_equal(again[key], value)
    original = parse_adapter(SafetensorsFile(tensors, metadata))
    round_tripped = parse_adapter(SafetensorsFile(again, again_metadata))
    assert {n: m.alpha for n, m in round_tripped.modules.items()} == {
        n: m.alpha for n, m in original.modules.items()
    }
    # ... and both are the source file's own weights.
    for key, source_value in source_lora.tensors.items():
        canonical_key = key.replace("text_encoder.", "text_encoder.text_model.", 1)
        np.testing.assert_array_equal(again[canonical_key], source_value.numpy())


def test_our_kohya_file_loads_in_diffusers_like_the_canonical(
    source_lora: SourceLora, tiny_base_dir: Path, load_output: LoadOutput
) -> None:
    tensors, metadata, _ = canonicalize(source_lora.path, base_model_dir=tiny_base_dir)
    kohya_tensors, kohya_metadata = to_kohya(SafetensorsFile(tensors, metadata))
    # diffusers' own kohya converter reads the per-module .alpha tensors.
    assert_same_output(load_output(kohya_tensors, kohya_metadata), load_output(tensors, metadata))
    assert_same_output(load_output(kohya_tensors, kohya_metadata), source_lora.lora_output)


def test_hand_made_kohya_file_imports_to_the_same_adapter(
    source_lora: SourceLora, tiny_base_dir: Path, load_output: LoadOutput
) -> None:
    kohya = hand_made_kohya(source_lora)
    diffusers_output = load_output(kohya)
    tensors, metadata, report = canonicalize(
        SafetensorsFile(as_numpy(kohya), {}), base_model_dir=tiny_base_dir
    )
    assert report.format == "kohya"
    assert report.unmatched_keys == []
    assert report.alphas[
        "text_encoder.encoder.layers.0.self_attn.q_proj"
    ] == TEXT_ALPHA and report.ranks["text_encoder.encoder.layers.0.self_attn.q_proj"] == (
        TEXT_RANK
    )
    assert_same_output(load_output(tensors, metadata), diffusers_output)
    assert_same_output(diffusers_output, source_lora.lora_output)


def test_original_checkpoint_naming_converts_like_diffusers_does(
    source_lora: SourceLora,
    base_pipe: Pipeline,
    tiny_base_dir: Path,
    load_output: LoadOutput,
) -> None:
    ldm = hand_made_kohya(source_lora, ldm_module_name)
    assert any("input_blocks_3_1_transformer_blocks" in k for k in ldm)
    assert any("output_blocks_3_0_in_layers_2" in k for k in ldm)
    # StableDiffusionPipeline maps these names only when given the UNet config.
    diffusers_output = load_output(ldm, unet_config=base_pipe.unet.config)
    tensors, metadata, report = canonicalize(
        SafetensorsFile(as_numpy(ldm), {}), base_model_dir=tiny_base_dir
    )
    assert report.format == "kohya_ldm"
    assert report.unmatched_keys == []
    assert_same_output(load_output(tensors, metadata), diffusers_output)
    assert_same_output(diffusers_output, source_lora.lora_output)


def test_peft_save_pretrained_file_imports(
    base_pipe: Pipeline,
    tiny_base_dir: Path,
    load_output: LoadOutput,
    tmp_path: Path,
) -> None:
    pipe = fresh_pipeline(base_pipe)
    torch.manual_seed(4)
    config = LoraConfig(r=3, lora_alpha=3, init_lora_weights="gaussian", target_modules=["to_q"])
    peft_unet = get_peft_model(pipe.unet, config)
    randomise_lora_b(peft_unet, seed=5)
    expected = model_output(pipe)
    peft_unet.save_pretrained(str(tmp_path / "peft"))

    tensors, metadata, report = canonicalize(
        tmp_path / "peft" / "adapter_model.safetensors", base_model_dir=tiny_base_dir
    )
    assert report.format == "peft"
    assert report.alpha_source == "default_rank"
    assert report.rank == 3 and report.target_modules == ["to_q"]
    assert_same_output(load_output(tensors, metadata), expected)


def test_describe_canonical(source_lora: SourceLora, tiny_base_dir: Path) -> None:
    tensors, metadata, _ = canonicalize(source_lora.path, base_model_dir=tiny_base_dir)
    summary = describe(parse_adapter(SafetensorsFile(tensors, metadata)))
    assert summary.rank == UNET_RANK
    assert summary.alpha == UNET_ALPHA
    assert summary.param_count == sum(v.numel() for v in source_lora.tensors.values())
    assert summary.module_count == len(source_lora.tensors) // 2
    assert summary.target_modules == sorted([*UNET_TARGETS, *TEXT_TARGETS])
    assert json.loads(metadata["lorastack_target_modules"]) == summary.target_modules


def test_lorafile_imports_no_torch_web_sql_or_settings() -> None:
    """The kernel is pure: the API process and the engine both import it (fresh interpreter)."""
    code = (
        "import sys\n"
        "import lorafile, lorafile.lint, lorafile.base_layout, lorafile.formats\n"
        "heavy = {'torch', 'diffusers', 'peft', 'transformers', 'fastapi', 'starlette',\n"
        "         'sqlalchemy', 'pydantic', 'pydantic_settings', 'celery', 'service',\n"
        "         'workers'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_per_module_rank_and_alpha_survive_every_conversion(
    base_pipe: Pipeline, tiny_base_dir: Path, load_output: LoadOutput, tmp_path: Path
) -> None:
    pipe = fresh_pipeline(base_pipe)
    torch.manual_seed(6)
    config = LoraConfig(
        r=4,
        lora_alpha=4,
        rank_pattern={"to_v": 2},
        alpha_pattern={"to_k": 12, "to_v": 1},
        init_lora_weights="gaussian",
        target_modules=["to_q", "to_k", "to_v"],
    )
    pipe.unet.add_adapter(config)
    randomise_lora_b(pipe.unet, seed=7)
    expected = model_output(pipe)
    pipe.save_lora_weights(
        tmp_path,
        unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        unet_lora_adapter_metadata=pipe.unet.peft_config["default"].to_dict(),
    )
    source = tmp_path / "pytorch_lora_weights.safetensors"
    assert_same_output(load_output(source), expected)

    tensors, metadata, report = canonicalize(source, base_model_dir=tiny_base_dir)
    to_v = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_v"
    to_k = to_v.replace("to_v", "to_k")
    assert (report.ranks[to_v], report.alphas[to_v]) == (2, 1.0)
    assert (report.ranks[to_k], report.alphas[to_k]) == (4, 12.0)
    assert_same_output(load_output(tensors, metadata), expected)

    kohya_tensors, kohya_metadata = to_kohya(SafetensorsFile(tensors, metadata))
    back, back_metadata, _ = canonicalize(
        SafetensorsFile(kohya_tensors, kohya_metadata), base_model_dir=tiny_base_dir
    )
    assert_same_output(load_output(back, back_metadata), expected)


def test_ldm_block_map_follows_the_sd15_checkpoint_layout() -> None:
    mapping = ldm_block_map(UNET_CONFIGS["sd15"])
    assert mapping["input_blocks.1.1"] == ("down_blocks.0.attentions.0", "attention")
    assert mapping["input_blocks.3.0"] == ("down_blocks.0.downsamplers.0", "downsampler")
    assert mapping["input_blocks.11.0"] == ("down_blocks.3.resnets.1", "resnet")
    assert "input_blocks.12.0" not in mapping
    assert mapping["middle_block.1"] == ("mid_block.attentions.0", "attention")
    assert mapping["output_blocks.2.1"] == ("up_blocks.0.upsamplers.0", "upsampler")
    assert mapping["output_blocks.5.2"] == ("up_blocks.1.upsamplers.0", "upsampler")
    assert mapping["output_blocks.11.1"] == ("up_blocks.3.attentions.2", "attention")
    assert "output_blocks.11.2" not in mapping


def test_every_writer_in_the_table_reads_back_as_its_own_format(
    source_lora: SourceLora, tiny_base_dir: Path
) -> None:
    tensors, metadata, _ = canonicalize(source_lora.path, base_model_dir=tiny_base_dir)
    adapter = parse_adapter(SafetensorsFile(tensors, metadata))
    assert set(WRITERS) == {"diffusers", "kohya"}
    for name in WRITERS:
        written, header = write_adapter(adapter, name, base_model="tiny")
        assert header["lorastack_format"] == name
        assert header["lorastack_version"] == LORASTACK_VERSION
        again = parse_adapter(read_safetensors(write_safetensors(written, header)))
        assert again.format == name
        assert again.modules.keys() == adapter.modules.keys()
        for module_name, module in again.modules.items():
            assert (module.rank, module.alpha) == (
                adapter.modules[module_name].rank,
                adapter.modules[module_name].alpha,
            )
            np.testing.assert_array_equal(module.down, adapter.modules[module_name].down)


def test_detection_takes_the_first_format_of_the_table_that_claims_a_key() -> None:
    down, up = np.ones((2, 4), "f4"), np.ones((4, 2), "f4")
    module = "unet.mid_block.attentions.0.proj_in"
    # peft's looser test (".lora_A." anywhere) claims these keys too; diffusers comes first.
    assert FORMATS["peft"].claims(f"{module}.lora_A.weight")
    assert list(FORMATS).index("diffusers") < list(FORMATS).index("peft")
    file = SafetensorsFile({f"{module}.lora_A.weight": down, f"{module}.lora_B.weight": up}, {})
    assert parse_adapter(file).format == "diffusers"
    mixed = SafetensorsFile(
        {"lora_unet_conv_in.lora_down.weight": down, f"{module}.lora_B.weight": up}, {}
    )
    with pytest.raises(InvalidAdapterFile) as caught:
        parse_adapter(mixed)
    assert caught.value.code == AdapterErrorCode.UNKNOWN_FORMAT


def test_written_version_is_the_installed_lorastack_version() -> None:
    from service import __version__ as service_version

    assert service_version == LORASTACK_VERSION
