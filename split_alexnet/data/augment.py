"""The device side of the input pipeline: float, minus the (cropped, flipped) mean image,
plus PCA colour noise, in raw 0-255 units as in the paper (section 4.1). See docs/data.md."""

from __future__ import annotations

import torch

from split_alexnet.data.dataset import CROP, tencrop_offsets
from split_alexnet.data.stats import Stats

_mean_cache: dict[tuple, tuple[torch.Tensor, ...]] = {}


def _device_stats(stats: Stats, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(mean, ten mean crops, eigval, eigvec) on ``device`` plus the host mean they came from,
    cached per (stats, device)."""
    key = (id(stats), stats.fingerprint, str(device))
    hit = _mean_cache.get(key)
    if hit is None or hit[4] is not stats.mean:
        if len(_mean_cache) > 8:
            _mean_cache.clear()
        mean = stats.mean.to(device=device, dtype=torch.float32)
        tencrop = torch.stack([_crop(mean, t, l, f) for t, l, f in tencrop_offsets()])
        hit = (mean, tencrop, stats.eigval.to(device, torch.float32),
               stats.eigvec.to(device, torch.float32), stats.mean)
        _mean_cache[key] = hit
    return hit


def _crop(x: torch.Tensor, top: int, left: int, flip: bool) -> torch.Tensor:
    c = x[..., top:top + CROP, left:left + CROP]
    return c.flip(-1) if flip else c


def mean_crops(mean: torch.Tensor, top: torch.Tensor, left: torch.Tensor,
               flip: torch.Tensor) -> torch.Tensor:
    """(B, 3, 227, 227): ``mean`` (3, 256, 256) cropped at each (top, left), flipped where
    ``flip`` - the same region and reflection as each training crop."""
    ar = torch.arange(CROP, device=mean.device)
    rows = top.to(mean.device)[:, None] + ar                       # (B, 227)
    cols = left.to(mean.device)[:, None] + torch.where(flip.to(mean.device)[:, None],
                                                       CROP - 1 - ar, ar)  # (B, 227)
    out = mean[:, rows[:, :, None], cols[:, None, :]]              # (3, B, 227, 227)
    return out.permute(1, 0, 2, 3)


def pca_noise(alpha: torch.Tensor, eigval: torch.Tensor, eigvec: torch.Tensor,
              pca: str = "paper") -> torch.Tensor:
    """(B, 3) RGB offsets in 0-255 units, ``eigvec @ (alpha * scale)`` with ``scale``:

    * ``"paper"``: the eigenvalues of the covariance of RGB values on the [0, 1] scale
      (``eigval / 255**2``), the offset then expressed in 0-255 units (``* 255``), i.e.
      ``eigval / 255``. The paper does not state its pixel scale; this is the reading whose
      eigenvalues match the published ImageNet ones (0.2175, 0.0188, 0.0045) and gives a
      noise of ~5 grey levels on ImageNet.
    * ``"paper-255"``: the formula with 0-255 eigenvalues taken literally (noise ~1400 levels
      on ImageNet, which drowns the image; kept so the choice is visible and testable).
    * ``"sqrt"``: ``sqrt(eigval)``, the reading of Krizhevsky's released code (~12 levels).
    """
    if pca == "off":
        return torch.zeros_like(alpha)
    if pca == "paper":
        scale = eigval / 255.0
    elif pca == "paper-255":
        scale = eigval
    else:
        scale = eigval.clamp_min(0).sqrt()
    return (alpha * scale) @ eigvec.T


def finish_batch(batch: dict, stats: Stats, device: torch.device | str, *,
                 dtype=torch.float32) -> torch.Tensor:
    """On ``device``: ``image.float() - mean crop (+ PCA noise in train batches)``.

    Train batches (``image`` (B,3,227,227)) subtract the mean image cropped at each item's
    (top, left) and flipped where it was flipped, then add the item's :func:`pca_noise` offset
    (for ``batch["pca"]``) to every pixel. Centre batches have top=left=14 and alpha=0 so the same
    code applies. Ten-crop batches ((B,10,3,227,227)) subtract the ten matching mean crops.
    Raw 0-255 scale, no division."""
    device = torch.device(device)
    mean, mean10, eigval, eigvec, _ = _device_stats(stats, device)
    img = batch["image"]
    nb = device.type == "cuda" and img.is_pinned()
    x = img.to(device, non_blocking=nb).to(torch.float32)
    if x.dim() == 5:
        x = x - mean10
    else:
        x = x - mean_crops(mean, batch["top"], batch["left"], batch["flip"])
        alpha = batch["alpha"]
        if alpha.numel() and bool(alpha.any()):
            noise = pca_noise(alpha.to(device, non_blocking=nb).float(),
                              eigval, eigvec, batch.get("pca", "paper"))
            x = x + noise[:, :, None, None]
    return x if dtype == torch.float32 else x.to(dtype)
