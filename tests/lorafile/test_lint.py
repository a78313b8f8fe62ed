"""The import lint against the tiny base model, read from its safetensors headers only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save as save_numpy

from lorafile import (
    AdapterErrorCode,
    AdapterLintError,
    BaseModelLayoutError,
    InvalidAdapterFile,
    LintReport,
    SafetensorsFile,
    canonicalize,
    read_base_model_layout,
    read_safetensors,
)
from tests.fixtures.lora_sources import (
    TEXT_ALPHA,
    TEXT_RANK,
    UNET_ALPHA,
    UNET_RANK,
    LoadOutput,
    SourceLora,
)

MID_TO_K = "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k"  # Linear 32 -> 64


@pytest.fixture
def source_file(source_lora: SourceLora) -> SafetensorsFile:
    return read_safetensors(source_lora.path)


def lint_report(file: SafetensorsFile, base: Path) -> LintReport:
    """The report of an import of ``file`` for the base model in ``base``."""
    _, _, report = canonicalize(file, base_model_dir=base)
    return report


def lint_error(file: SafetensorsFile, base: Path) -> AdapterLintError:
    with pytest.raises(AdapterLintError) as caught:
        canonicalize(file, base_model_dir=base)
    return caught.value


def test_base_layout_comes_from_headers(tiny_base_dir: Path) -> None:
    layout = read_base_model_layout(tiny_base_dir)
    assert layout.modules["unet"][MID_TO_K.removeprefix("unet.")] == (64, 32)
    assert layout.modules["unet"]["down_blocks.0.resnets.0.conv1"] == (32, 32, 3, 3)
    assert layout.modules["text_encoder"]["encoder.layers.1.mlp.fc1"] == (64, 32)
    assert layout.unet_config is not None and layout.unet_config["layers_per_block"] == 1
    with pytest.raises(BaseModelLayoutError):
        read_base_model_layout(tiny_base_dir / "missing")


def test_report_describes_a_clean_adapter(
    source_file: SafetensorsFile, tiny_base_dir: Path
) -> None:
    report = lint_report(source_file, tiny_base_dir)
    assert report.format == "diffusers"
    assert report.alpha_source == "header_metadata"
    assert (report.rank, report.alpha) == (UNET_RANK, UNET_ALPHA)
    q_proj = "text_encoder.encoder.layers.0.self_attn.q_proj"
    assert (report.ranks[q_proj], report.alphas[q_proj]) == (TEXT_RANK, TEXT_ALPHA)
    assert report.ranks[MID_TO_K] == UNET_RANK
    assert sorted(report.matched_keys) == sorted(source_file.tensors)
    assert report.unmatched_keys == [] and report.warnings == [] and report.errors == []
    assert "to_out.0" in report.target_modules and "fc1" in report.target_modules
    assert report.param_count == sum(v.size for v in source_file.tensors.values())
    assert json.loads(json.dumps(report.to_dict()))["ranks"][MID_TO_K] == UNET_RANK


def test_shape_mismatch_is_an_error(source_file: SafetensorsFile, tiny_base_dir: Path) -> None:
    tensors = dict(source_file.tensors)
    # Rank stays consistent (4), but in_features 64 does not fit the base's 32.
    tensors[f"{MID_TO_K}.lora_A.weight"] = np.ones((UNET_RANK, 64), dtype=np.float32)
    error = lint_error(SafetensorsFile(tensors, source_file.metadata), tiny_base_dir)
    assert error.code == AdapterErrorCode.SHAPE_MISMATCH
    assert MID_TO_K in error.message
    assert any(MID_TO_K in e for e in error.report.errors)

    tensors = dict(source_file.tensors)
    tensors[f"{MID_TO_K}.lora_B.weight"] = np.ones((32, UNET_RANK), dtype=np.float32)
    error = lint_error(SafetensorsFile(tensors, source_file.metadata), tiny_base_dir)
    assert error.code == AdapterErrorCode.SHAPE_MISMATCH


def test_nothing_matching_the_base_is_an_error(
    source_file: SafetensorsFile, tiny_base_dir: Path
) -> None:
    renamed = {
        k.replace("unet.", "unet.sdxl_only.").replace("text_encoder.", "text_encoder_2."): v
        for k, v in source_file.tensors.items()
    }
    error = lint_error(SafetensorsFile(renamed, {}), tiny_base_dir)
    assert error.code == AdapterErrorCode.NO_MATCHING_MODULES
    assert error.report.matched_keys == []
    assert sorted(error.report.unmatched_keys) == sorted(renamed)


def test_partial_match_is_accepted_with_warnings(
    source_file: SafetensorsFile, tiny_base_dir: Path, load_output: LoadOutput
) -> None:
    tensors = dict(source_file.tensors)
    stray = "unet.down_blocks.9.attentions.0.proj_in"
    tensors[f"{stray}.lora_A.weight"] = np.ones((UNET_RANK, 32, 1, 1), dtype=np.float32)
    tensors[f"{stray}.lora_B.weight"] = np.ones((32, UNET_RANK, 1, 1), dtype=np.float32)
    partial = SafetensorsFile(tensors, source_file.metadata)

    canonical, metadata, report = canonicalize(partial, base_model_dir=tiny_base_dir)
    assert report.unmatched_keys == [f"{stray}.lora_A.weight", f"{stray}.lora_B.weight"]
    assert any(stray in w for w in report.warnings)
    assert not any(k.startswith(stray) for k in canonical)
    assert len(canonical) == len(source_file.tensors)
    load_output(canonical, metadata)  # loads without the dropped module


def test_invalid_files_become_lint_errors(source_lora: SourceLora, tiny_base_dir: Path) -> None:
    data = source_lora.path.read_bytes()
    int_file = save_numpy({"unet.x.lora_A.weight": np.zeros((2, 2), dtype=np.int32)})
    for payload, code in (
        (data[: len(data) // 2], AdapterErrorCode.TRUNCATED),
        (int_file, AdapterErrorCode.UNSUPPORTED_DTYPE),
    ):
        with pytest.raises(AdapterLintError) as caught:
            canonicalize(payload, base_model_dir=tiny_base_dir)
        assert caught.value.code == code
        assert isinstance(caught.value.__cause__, InvalidAdapterFile)
        assert caught.value.report.errors


def test_int_weights_built_in_memory_are_refused(
    source_file: SafetensorsFile, tiny_base_dir: Path
) -> None:
    tensors = dict(source_file.tensors)
    tensors[f"{MID_TO_K}.lora_A.weight"] = np.ones((UNET_RANK, 32), dtype=np.int64)
    error = lint_error(SafetensorsFile(tensors, {}), tiny_base_dir)
    assert error.code == AdapterErrorCode.UNSUPPORTED_DTYPE


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ("drop_up", AdapterErrorCode.INCOMPLETE_PAIR),
        ("rank_disagrees", AdapterErrorCode.SHAPE_MISMATCH),
        ("lycoris", AdapterErrorCode.UNSUPPORTED_ADAPTER),
        ("mixed_formats", AdapterErrorCode.UNKNOWN_FORMAT),
        ("regex_alpha_pattern", AdapterErrorCode.INVALID_METADATA),
        ("header_rank_disagrees", AdapterErrorCode.INVALID_METADATA),
        ("rslora", AdapterErrorCode.UNSUPPORTED_ADAPTER),
        ("nan", AdapterErrorCode.INVALID_TENSOR),
    ],
)
def test_malformed_adapters_are_refused(
    source_file: SafetensorsFile, tiny_base_dir: Path, change: str, code: AdapterErrorCode
) -> None:
    tensors = dict(source_file.tensors)
    config = json.loads(source_file.metadata["lora_adapter_metadata"])
    if change == "drop_up":
        del tensors[f"{MID_TO_K}.lora_B.weight"]
    elif change == "rank_disagrees":
        tensors[f"{MID_TO_K}.lora_B.weight"] = np.ones((64, UNET_RANK + 1), dtype=np.float32)
    elif change == "lycoris":
        tensors["unet.conv_in.hada_w1_a"] = np.ones((4, 4), dtype=np.float32)
    elif change == "mixed_formats":
        tensors["lora_unet_conv_in.lora_down.weight"] = np.ones((4, 4), dtype=np.float32)
    elif change == "regex_alpha_pattern":
        config["unet.alpha_pattern"] = {"(a+)+$": 3}
    elif change == "header_rank_disagrees":
        config["unet.r"] = UNET_RANK * 2
    elif change == "rslora":
        config["unet.use_rslora"] = True
    elif change == "nan":
        broken = tensors[f"{MID_TO_K}.lora_B.weight"].copy()
        broken[0, 0] = np.nan
        tensors[f"{MID_TO_K}.lora_B.weight"] = broken
    metadata = {**source_file.metadata, "lora_adapter_metadata": json.dumps(config)}
    error = lint_error(SafetensorsFile(tensors, metadata), tiny_base_dir)
    assert error.code == code, error.message


def test_linear_lora_on_a_1x1_conv_is_reshaped_not_refused(
    source_file: SafetensorsFile, tiny_base_dir: Path, load_output: LoadOutput
) -> None:
    proj_in = "unet.down_blocks.1.attentions.0.proj_in"
    tensors = {
        k: (v[:, :, 0, 0] if k.startswith(proj_in) else v) for k, v in source_file.tensors.items()
    }
    assert tensors[f"{proj_in}.lora_A.weight"].ndim == 2

    canonical, metadata, report = canonicalize(
        SafetensorsFile(tensors, source_file.metadata), base_model_dir=tiny_base_dir
    )
    assert any(proj_in in w and "1x1 conv" in w for w in report.warnings)
    np.testing.assert_array_equal(
        canonical[f"{proj_in}.lora_A.weight"], source_file.tensors[f"{proj_in}.lora_A.weight"]
    )
    reference, _, _ = canonicalize(source_file, base_model_dir=tiny_base_dir)
    torch.testing.assert_close(load_output(canonical, metadata), load_output(reference, metadata))


def test_ldm_kohya_without_a_unet_config_is_reported(
    source_file: SafetensorsFile, tmp_path: Path, tiny_base_dir: Path
) -> None:
    # A base folder whose UNet has weights but no config.json.
    base = tmp_path / "base"
    for sub, name in (("unet", "diffusion_pytorch_model"), ("text_encoder", "model")):
        (base / sub).mkdir(parents=True)
        (base / sub / f"{name}.safetensors").symlink_to(tiny_base_dir / sub / f"{name}.safetensors")
    ldm = {"lora_unet_middle_block_1_proj_in.lora_down.weight": np.ones((2, 64, 1, 1), "f4")}
    ldm["lora_unet_middle_block_1_proj_in.lora_up.weight"] = np.ones((64, 2, 1, 1), "f4")
    error = lint_error(SafetensorsFile(ldm, {}), base)
    assert error.code == AdapterErrorCode.NEEDS_UNET_CONFIG

    report = lint_report(SafetensorsFile(ldm, {}), tiny_base_dir)
    assert report.format == "kohya_ldm"
    assert report.ranks == {"unet.mid_block.attentions.0.proj_in": 2}


def test_text_encoder_weights_saved_under_text_model_match_too(
    source_file: SafetensorsFile, tmp_path: Path, tiny_base_dir: Path
) -> None:
    """Hub SD 1.5 folders name CLIP weights text_model.encoder...; transformers 5 drops it."""
    base = tmp_path / "hub-style"
    (base / "unet").mkdir(parents=True)
    (base / "text_encoder").mkdir()
    for name in ("diffusion_pytorch_model.safetensors", "config.json"):
        (base / "unet" / name).symlink_to(tiny_base_dir / "unet" / name)
    text_weights = read_safetensors(tiny_base_dir / "text_encoder" / "model.safetensors")
    (base / "text_encoder" / "model.safetensors").write_bytes(
        save_numpy({f"text_model.{k}": v for k, v in text_weights.tensors.items()})
    )
    report = lint_report(source_file, base)
    assert report.unmatched_keys == []
    assert report.ranks["text_encoder.encoder.layers.1.mlp.fc1"] == TEXT_RANK
