"""The metric formulas, on L2-normalised embeddings (rows), as pure torch functions.

- CLIP score: 100 * max(cos(image, text), 0) (Hessel et al. 2021, as torchmetrics computes it).
- Fidelity: mean cosine similarity of each generated image to every training image
  (DINO and CLIP-I, as DreamBooth reports them).
- Feature distance: 1 - cos(base image, LoRA image) of the same prompt and seed.
- CMMD: the maximum mean discrepancy between CLIP embeddings of two image sets with a Gaussian
  RBF kernel, sigma 10, scaled by 1000 (Jayasumana et al. 2024).
"""

from __future__ import annotations

import torch

CMMD_SIGMA = 10.0
CMMD_SCALE = 1000.0


def clip_scores(images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    """One score per (image, text) row pair."""
    return 100.0 * (images * texts).sum(dim=-1).clamp_min(0.0)


def mean_similarity(generated: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """For each generated row, its mean cosine similarity to all reference rows."""
    return (generated @ references.T).mean(dim=1)


def feature_distances(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity of each row pair (0 = same features, up to 2)."""
    return 1.0 - (first * second).sum(dim=-1)


def cmmd(first: torch.Tensor, second: torch.Tensor, *, sigma: float = CMMD_SIGMA) -> float:
    """MMD^2 between two embedding sets (biased estimator over all pairs), times 1000."""
    x, y = first.double(), second.double()
    gamma = 1.0 / (2.0 * sigma**2)

    def kernel_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.exp(-gamma * torch.cdist(a, b).pow(2)).mean()

    value = kernel_mean(x, x) + kernel_mean(y, y) - 2.0 * kernel_mean(x, y)
    return float(CMMD_SCALE * value.clamp_min(0.0))
