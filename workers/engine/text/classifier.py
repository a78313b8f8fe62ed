"""Classification with one warm base model and several LoRA adapters resident at once.

Every adapter is loaded into the same peft model (``load_adapter``); a call may give each input
its own adapter, or none for the base model, and still runs as one forward pass: peft routes
each row through its adapter's LoRA weights and its own copy of the classifier head
(``adapter_names=``, "mixed-batch" inference).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from workers.engine.text.trainer import load_classifier

# peft's name for "no adapter" rows in a mixed batch.
_BASE = "__base__"


@dataclass(frozen=True)
class Classification:
    """One input's answer: the top label and the ``top_k`` (label, probability) pairs."""

    label: str
    scores: list[tuple[str, float]]


class TextClassifierEngine:
    """A base sequence classifier on ``device`` with named LoRA adapters loaded beside it."""

    def __init__(self, model_dir: Path, *, device: str = "cpu", max_length: int = 128) -> None:
        from transformers import AutoTokenizer

        self.model_dir = Path(model_dir)
        self.device = torch.device(device)
        self.max_length = max_length
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.base: Any = load_classifier(Path(model_dir)).to(self.device).eval()
        self.model: Any = self.base  # becomes a PeftModel with the first adapter
        self.id2label: dict[int, str] = dict(self.base.config.id2label)

    @property
    def adapters(self) -> list[str]:
        """Names of the resident adapters."""
        return [] if self.model is self.base else list(self.model.peft_config)

    def load_adapter(self, name: str, adapter_dir: Path) -> None:
        """Load the peft adapter folder ``adapter_dir`` under ``name`` (once per name)."""
        from peft import PeftModel

        if name == _BASE:
            raise ValueError(f"{_BASE!r} is reserved for the base model")
        if name in self.adapters:
            return
        if self.model is self.base:
            self.model = PeftModel.from_pretrained(self.base, adapter_dir, adapter_name=name)
        else:
            self.model.load_adapter(adapter_dir, adapter_name=name)
        self.model.to(self.device).eval()

    def unload_adapter(self, name: str) -> None:
        """Remove adapter ``name`` (the last one removed leaves the base model alone)."""
        if name not in self.adapters:
            raise KeyError(name)
        if len(self.adapters) > 1:
            self.model.delete_adapter(name)
            return
        # The last one. peft's unload() would keep that adapter's trained head in place of the
        # base head, so the untouched base is read again instead.
        self.base = load_classifier(self.model_dir).to(self.device).eval()
        self.model = self.base

    @torch.no_grad()
    def classify(
        self,
        texts: Sequence[str],
        adapters_per_row: Sequence[str | None] | None = None,
        *,
        top_k: int = 1,
    ) -> list[Classification]:
        """Classify ``texts``, row i with adapter ``adapters_per_row[i]`` (None: the base)."""
        if not texts:
            return []
        rows = list(adapters_per_row) if adapters_per_row is not None else [None] * len(texts)
        if len(rows) != len(texts):
            raise ValueError("adapters_per_row must have one entry per text")
        unknown = sorted({name for name in rows if name is not None} - set(self.adapters))
        if unknown:
            raise KeyError(f"adapters not loaded: {', '.join(unknown)}")
        encoded = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        ).to(self.device)
        if self.model is self.base:
            logits = self.base(**encoded).logits
        else:
            names = [name if name is not None else _BASE for name in rows]
            logits = self.model(**encoded, adapter_names=names).logits
        return self._answers(logits.float().softmax(dim=-1), top_k)

    def _answers(self, probs: torch.Tensor, top_k: int) -> list[Classification]:
        k = max(1, min(top_k, probs.shape[-1]))
        values, indices = probs.topk(k, dim=-1)
        answers = []
        for row_values, row_indices in zip(values.tolist(), indices.tolist(), strict=True):
            scores = [
                (self.id2label[index], value)
                for index, value in zip(row_indices, row_values, strict=True)
            ]
            answers.append(Classification(label=scores[0][0], scores=scores))
        return answers
