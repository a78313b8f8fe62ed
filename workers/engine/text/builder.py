"""Randomly initialised text classifiers in transformers folder format, built locally.

``tiny-text`` is a DistilBERT-shaped ``DistilBertForSequenceClassification`` small enough for
CPU tests; its WordPiece tokenizer is written here (no model hub), so every text tokenises:
whole words from the synthetic sentiment set, else single characters and ``##`` pieces.
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any, Literal

from workers.engine.text.sentiment import LABELS, vocabulary

TextPreset = Literal["tiny-text"]
TEXT_PRESETS: tuple[TextPreset, ...] = ("tiny-text",)

SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

TEXT_MODEL_CONFIGS: dict[TextPreset, dict[str, Any]] = {
    "tiny-text": {
        "dim": 32,
        "n_layers": 2,
        "n_heads": 2,
        "hidden_dim": 64,
        "max_position_embeddings": 128,
        "dropout": 0.0,
        "attention_dropout": 0.0,
        "seq_classif_dropout": 0.1,
        # Wider than the usual 0.02: a random tiny model then starts learning within a few
        # dozen steps instead of sitting on a plateau.
        "initializer_range": 0.2,
    },
}


def wordpiece_vocab() -> list[str]:
    """Special tokens, the sentiment set's words, then characters and ``##`` characters."""
    chars = string.ascii_lowercase + string.digits + string.punctuation
    tokens = list(SPECIAL_TOKENS)
    seen = set(tokens)
    for token in [*vocabulary(), *chars, *(f"##{c}" for c in chars)]:
        if token not in seen:
            seen.add(token)
            tokens.append(token)
    return tokens


def write_wordpiece_tokenizer(out_dir: Path, *, max_length: int) -> None:
    """Write vocab.txt and a DistilBERT tokenizer config into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.txt").write_text("\n".join(wordpiece_vocab()) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "DistilBertTokenizer",
        "do_lower_case": True,
        "model_max_length": max_length,
        "pad_token": "[PAD]",
        "unk_token": "[UNK]",
        "cls_token": "[CLS]",
        "sep_token": "[SEP]",
        "mask_token": "[MASK]",
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def build_text_classifier_folder(
    preset: TextPreset,
    out_dir: Path,
    *,
    seed: int = 0,
    labels: tuple[str, ...] = LABELS,
) -> Path:
    """Write a randomly initialised sequence classifier (model and tokenizer) into ``out_dir``.

    Loads with ``AutoModelForSequenceClassification`` and ``AutoTokenizer.from_pretrained``.
    """
    import torch
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertForSequenceClassification

    if preset not in TEXT_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {', '.join(TEXT_PRESETS)}")
    out_dir = Path(out_dir)
    settings = TEXT_MODEL_CONFIGS[preset]
    write_wordpiece_tokenizer(out_dir, max_length=settings["max_position_embeddings"])
    # Loaded back before the model is saved: the saved folder then carries the fast
    # tokenizer's own files as well as vocab.txt.
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    torch.manual_seed(seed)
    # num_labels, id2label and label2id are PretrainedConfig keywords the stubs do not list.
    config = DistilBertConfig(  # type: ignore[call-arg]
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: index for index, label in enumerate(labels)},
        **settings,
    )
    model = DistilBertForSequenceClassification(config)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
