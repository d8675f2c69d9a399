"""PyTorch / PIL / torchvision implementations of SPEC sections 1 and 4, used as test references."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def torchvision_preprocess(rgb: np.ndarray, size: int, mean, std) -> torch.Tensor:
    """Resize straight to size x size with PIL bilinear (antialiased), ToTensor, Normalize."""
    from PIL import Image
    from torchvision import transforms

    pipeline = transforms.Compose([
        transforms.Resize((size, size), interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])
    return pipeline(Image.fromarray(rgb)).unsqueeze(0)


def torch_abnormal_probability(tokens: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    x = F.normalize(tokens, dim=-1)
    t = F.normalize(text, dim=-1)
    return torch.softmax(x @ t.T, dim=-1)[..., 1]


def torch_anomaly_map(tokens: torch.Tensor, text: torch.Tensor, grid, size) -> torch.Tensor:
    """[B, M, D] -> [B, H, W]: 3x3 mean filter (replicate padding), bilinear upsampling, align_corners=True."""
    probs = torch_abnormal_probability(tokens, text).reshape(tokens.shape[0], 1, *grid)
    smoothed = F.avg_pool2d(F.pad(probs, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return F.interpolate(smoothed, size=size, mode="bilinear", align_corners=True)[:, 0]
