"""Evaluation of LoRA adapters: evaluator models (CLIP, DINO), the metrics, and the evaluator
that renders base and LoRA images at the same seeds on the warm inference engine.

- ``models``: ``EvaluatorModels`` (loaded with ``from_pretrained``) and the tiny, randomly
  initialised evaluator folders for the embedded default and tests.
- ``metrics``: the metric formulas on embeddings (pure torch).
- ``evaluator``: ``AdapterEvaluator`` and ``EvaluationSpec``.
"""
