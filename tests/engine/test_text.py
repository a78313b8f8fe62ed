"""Text classification at the engine level: the tiny-text builder, LoRA and full training with
exact resume and cancel, and mixed-adapter inference, all on real transformers and peft."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from lorastack.cli import main as cli_main
from workers.engine.text.builder import build_text_classifier_folder
from workers.engine.text.callbacks import EvalMetrics, NullTextCallbacks
from workers.engine.text.classifier import TextClassifierEngine
from workers.engine.text.config import TextTrainConfig
from workers.engine.text.sentiment import sentiment_items
from workers.engine.text.trainer import TextTrainResult, train_text_classifier
from workers.engine.training.callbacks import StepProgress
from workers.engine.training.errors import ConfigError, TrainingCancelled

# Settings under which the tiny model learns the synthetic set in about a hundred steps.
LEARNS = TextTrainConfig(method="lora", learning_rate=1e-2, epochs=5, batch_size=16, eval_every=50)


class Recorder(NullTextCallbacks):
    """Keeps every report; stops before step ``stop_after + 1`` when set."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.steps: list[StepProgress] = []
        self.evaluations: list[EvalMetrics] = []
        self.checkpoints: list[int] = []
        self.resumed: list[int] = []
        self.stop_after = stop_after

    def on_step(self, progress: StepProgress) -> None:
        self.steps.append(progress)

    def on_evaluation(self, metrics: EvalMetrics) -> None:
        self.evaluations.append(metrics)

    def on_checkpoint(self, checkpoint: object) -> None:
        self.checkpoints.append(checkpoint.step)  # type: ignore[attr-defined]

    def on_resumed(self, step: int) -> None:
        self.resumed.append(step)

    def should_stop(self) -> bool:
        return self.stop_after is not None and len(self.steps) >= self.stop_after


@pytest.fixture(scope="module")
def text_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_text_classifier_folder("tiny-text", tmp_path_factory.mktemp("tiny-text"))


@pytest.fixture(scope="module")
def items() -> list[tuple[str, int]]:
    return sentiment_items(400, seed=0)


@pytest.fixture(scope="module")
def trained(
    text_model_dir: Path, items: list[tuple[str, int]], tmp_path_factory: pytest.TempPathFactory
) -> tuple[TextTrainResult, Recorder]:
    recorder = Recorder()
    result = train_text_classifier(
        model_dir=text_model_dir,
        items=items,
        config=LEARNS,
        output_dir=tmp_path_factory.mktemp("lora-run"),
        callbacks=recorder,
        device="cpu",
    )
    return result, recorder


def test_tiny_text_folder_loads_with_auto_classes(tmp_path: Path) -> None:
    out = tmp_path / "model"
    cli_main(["init-model", "--preset", "tiny-text", str(out)])
    model = AutoModelForSequenceClassification.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.model_type == "distilbert"
    assert model.config.id2label == {0: "negative", 1: "positive"}
    assert (out / "vocab.txt").is_file()
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("The film was GREAT zz").input_ids)
    assert tokens == ["[CLS]", "the", "film", "was", "great", "z", "##z", "[SEP]"]
    same = build_text_classifier_folder("tiny-text", tmp_path / "again", seed=0)
    assert torch.equal(
        load_file(out / "model.safetensors")["classifier.weight"],
        load_file(same / "model.safetensors")["classifier.weight"],
    )


def test_lora_learns_the_synthetic_set(trained: tuple[TextTrainResult, Recorder]) -> None:
    result, recorder = trained
    assert result.metrics is not None and result.metrics.accuracy >= 0.9
    assert result.metrics.f1 >= 0.9
    assert [m.step for m in recorder.evaluations] == [50, 100]
    assert recorder.evaluations[0].count == 80  # the 20 % validation split
    assert len(recorder.steps) == result.steps == 100
    assert result.trainable_params < result.total_params
    assert 0 < result.trainable_percent < 100
    assert (
        result.file_size_bytes == (result.output_path / "adapter_model.safetensors").stat().st_size
    )


def test_saved_adapter_loads_with_peft_and_matches_the_engine(
    trained: tuple[TextTrainResult, Recorder], text_model_dir: Path
) -> None:
    result, _ = trained
    base = AutoModelForSequenceClassification.from_pretrained(text_model_dir)
    model = PeftModel.from_pretrained(base, result.output_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(text_model_dir)
    texts = ["the meal was superb .", "honestly , the room felt dreadful to me ."]
    with torch.no_grad():
        probs = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits.softmax(-1)
    assert probs.argmax(-1).tolist() == [1, 0]
    engine = TextClassifierEngine(text_model_dir)
    engine.load_adapter("sentiment", result.output_path)
    answers = engine.classify(texts, ["sentiment", "sentiment"], top_k=2)
    assert [a.label for a in answers] == ["positive", "negative"]
    for answer, row in zip(answers, probs.tolist(), strict=True):
        by_label = dict(answer.scores)
        assert by_label["negative"] == pytest.approx(row[0], abs=1e-5)
        assert by_label["positive"] == pytest.approx(row[1], abs=1e-5)


def test_mixed_batch_rows_equal_each_row_alone(
    trained: tuple[TextTrainResult, Recorder],
    text_model_dir: Path,
    items: list[tuple[str, int]],
    tmp_path: Path,
) -> None:
    result, _ = trained
    # A second adapter with different weights: a short run from another seed.
    other = train_text_classifier(
        model_dir=text_model_dir,
        items=items[:64],
        config=TextTrainConfig(method="lora", learning_rate=1e-2, max_steps=3, seed=7),
        output_dir=tmp_path,
        callbacks=NullTextCallbacks(),
    )
    engine = TextClassifierEngine(text_model_dir)
    engine.load_adapter("a", result.output_path)
    engine.load_adapter("b", other.output_path)
    texts = ["the film was great .", "our trip was awful .", "the book", "i think x is ok ."]
    rows = ["a", "b", None, "a"]
    mixed = engine.classify(texts, rows, top_k=2)
    alone = [engine.classify([t], [r], top_k=2)[0] for t, r in zip(texts, rows, strict=True)]
    for got, want in zip(mixed, alone, strict=True):
        assert got.label == want.label
        assert dict(got.scores) == pytest.approx(dict(want.scores), abs=1e-5)
    # The rows really differ by adapter: the same text under a, b and the base.
    same_text = engine.classify([texts[0]] * 3, ["a", "b", None])
    assert len({round(a.scores[0][1], 4) for a in same_text}) == 3
    with pytest.raises(KeyError):
        engine.classify(["x"], ["missing"])
    engine.unload_adapter("b")
    assert engine.adapters == ["a"]
    with pytest.raises(KeyError):
        engine.classify(["x"], ["b"])
    after = engine.classify(texts, ["a", "a", None, "a"], top_k=2)
    assert dict(after[0].scores) == pytest.approx(dict(mixed[0].scores), abs=1e-5)
    assert dict(after[2].scores) == pytest.approx(dict(mixed[2].scores), abs=1e-5)
    # Base rows are the untouched base model, before and after the last adapter goes.
    fresh = TextClassifierEngine(text_model_dir).classify([texts[2]], top_k=2)[0]
    assert dict(fresh.scores) == pytest.approx(dict(mixed[2].scores), abs=1e-5)
    engine.unload_adapter("a")
    assert engine.adapters == []
    base_only = engine.classify([texts[2]], top_k=2)[0]
    assert dict(base_only.scores) == pytest.approx(dict(fresh.scores), abs=1e-5)


def _trainable(result: TextTrainResult) -> dict[str, torch.Tensor]:
    return load_file(result.output_path / "adapter_model.safetensors")


def test_resume_after_cancel_equals_an_uninterrupted_run(
    text_model_dir: Path, items: list[tuple[str, int]], tmp_path: Path
) -> None:
    config = TextTrainConfig(
        method="lora",
        learning_rate=1e-2,
        max_steps=6,
        batch_size=8,
        gradient_accumulation_steps=2,
        checkpoint_every=2,
        dropout=0.1,
        seed=3,
    )
    data = items[:80]
    whole = train_text_classifier(
        model_dir=text_model_dir,
        items=data,
        config=config,
        output_dir=tmp_path / "whole",
        callbacks=NullTextCallbacks(),
    )
    stopper = Recorder(stop_after=3)
    with pytest.raises(TrainingCancelled) as cancelled:
        train_text_classifier(
            model_dir=text_model_dir,
            items=data,
            config=config,
            output_dir=tmp_path / "split",
            callbacks=stopper,
        )
    assert cancelled.value.step == 3 and stopper.checkpoints == [2]
    resumer = Recorder()
    resumed = train_text_classifier(
        model_dir=text_model_dir,
        items=data,
        config=config,
        output_dir=tmp_path / "split",
        callbacks=resumer,
    )
    assert resumer.resumed == [2] and resumed.resumed_from_step == 2
    assert [p.step for p in resumer.steps] == [3, 4, 5, 6]
    assert resumed.final_loss == whole.final_loss
    watcher = Recorder()
    train_text_classifier(
        model_dir=text_model_dir,
        items=data,
        config=config,
        output_dir=tmp_path / "watched",
        callbacks=watcher,
    )
    # The smoothed loss carries across the resume: the same figures as the uninterrupted run.
    assert [p.smoothed_loss for p in resumer.steps] == [p.smoothed_loss for p in watcher.steps[2:]]
    assert watcher.steps[0].smoothed_loss == pytest.approx(watcher.steps[0].loss)
    want, got = _trainable(whole), _trainable(resumed)
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    changed = TextTrainConfig(**{**config.to_dict(), "target_modules": None, "rank": 4})
    with pytest.raises(ConfigError, match="rank"):
        train_text_classifier(
            model_dir=text_model_dir,
            items=data,
            config=changed,
            output_dir=tmp_path / "split",
            callbacks=NullTextCallbacks(),
        )


def test_full_fine_tune_writes_a_loadable_model(
    text_model_dir: Path, items: list[tuple[str, int]], tmp_path: Path
) -> None:
    result = train_text_classifier(
        model_dir=text_model_dir,
        items=items,
        config=TextTrainConfig(method="full", learning_rate=3e-3, epochs=3),
        output_dir=tmp_path,
        callbacks=NullTextCallbacks(),
    )
    assert result.trainable_params == result.total_params
    assert result.metrics is not None and result.metrics.accuracy >= 0.9
    engine = TextClassifierEngine(result.output_path)
    assert engine.classify(["the show was lovely ."])[0].label == "positive"


def test_config_refuses_bad_settings() -> None:
    with pytest.raises(ConfigError, match="method"):
        TextTrainConfig(method="qlora")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="validation_split"):
        TextTrainConfig(validation_split=1.0)


def test_bert_gets_its_own_lora_targets_and_head(text_model_dir: Path, tmp_path: Path) -> None:
    from transformers import BertConfig, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(text_model_dir)
    bert_dir = tmp_path / "bert"
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
    )
    BertForSequenceClassification(config).save_pretrained(bert_dir)
    tokenizer.save_pretrained(bert_dir)
    result = train_text_classifier(
        model_dir=bert_dir,
        items=sentiment_items(32),
        config=TextTrainConfig(max_steps=2, batch_size=8),
        output_dir=tmp_path / "run",
        callbacks=NullTextCallbacks(),
    )
    names = set(_trainable(result))
    assert any(".query.lora_A." in n for n in names)
    assert any(".value.lora_B." in n for n in names)
    assert not any(".key." in n for n in names)
    assert any("classifier" in n for n in names)
