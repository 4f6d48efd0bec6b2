"""Replication scores, the memorization rate (MR) and Wen et al.'s detector.

- Organism: SSIM between a generation and the training image, both 32x32 RGB in [0, 1] (Gaussian window of
  7 pixels, sigma 1.5). Its threshold is calibrated on data in chapter 0.
- Stable Diffusion: SSCD (`sscd_disc_mixup` TorchScript; images resized to 320x320 without cropping,
  ImageNet mean/std normalisation; cosine similarity of the L2-normalised descriptors; > 0.7 is a
  replication), as NeMo and the Dori paper use.
- MR: the share of memorized items that are replicated; an item counts as replicated when the *median*
  score over its generations (seeds) exceeds the threshold. The median is the ordinary one (numpy's: with an
  even number of seeds, the mean of the two middle scores), so with two seeds an item counts when the mean of
  its two scores exceeds the threshold. The paper does not say whether MR is per image or per generation; this
  is our choice.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

SSCD_URL = "https://dl.fbaipublicfiles.com/sscd-copy-detection/sscd_disc_mixup.torchscript.pt"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def local_moments(x: torch.Tensor, y: torch.Tensor, window: int, sigma: float = 1.5):
    """Gaussian-weighted local means, variances and covariance of two N x C x H x W tensors (valid padding):
    the ingredients of SSIM and of the multi-scale SSIM that NeMo uses."""
    channels = x.shape[1]
    coords = torch.arange(window, device=x.device, dtype=x.dtype) - (window - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(channels, 1, window, window).contiguous()

    def blur(v):
        return F.conv2d(v, kernel, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    return mu_x, mu_y, blur(x * x) - mu_x**2, blur(y * y) - mu_y**2, blur(x * y) - mu_x * mu_y


def ssim_score(generated: torch.Tensor, reference: torch.Tensor, window: int = 7, sigma: float = 1.5) -> torch.Tensor:
    """Mean SSIM per image between N x 3 x H x W images in [0, 1]; ``reference`` broadcasts (1 x 3 x H x W)."""
    generated = generated.float()
    reference = reference.float().to(generated.device).expand_as(generated)
    if generated.ndim != 4 or generated.shape[1] != 3:
        raise ValueError(f"expected N x 3 x H x W images, got {tuple(generated.shape)}")
    c1, c2 = 0.01**2, 0.03**2
    mu_x, mu_y, var_x, var_y, cov = local_moments(generated, reference, window, sigma)
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(1)


def load_sscd(path_or_url: str = SSCD_URL, cache_dir: str | None = None, device="cpu") -> torch.jit.ScriptModule:
    """Load the SSCD TorchScript model from a local file or URL (downloaded once into the torch hub cache)."""
    import os

    if os.path.exists(path_or_url):
        path = path_or_url
    else:
        cache_dir = cache_dir or os.path.join(torch.hub.get_dir(), "sscd")
        os.makedirs(cache_dir, exist_ok=True)
        path = os.path.join(cache_dir, os.path.basename(path_or_url))
        if not os.path.exists(path):
            try:
                torch.hub.download_url_to_file(path_or_url, path)
            except Exception as error:
                raise RuntimeError(
                    f"Could not download SSCD from {path_or_url} ({error}). Download "
                    "sscd_disc_mixup.torchscript.pt by hand and pass its path to load_sscd()."
                ) from error
    try:
        return torch.jit.load(path, map_location=device).eval()
    except Exception as error:
        raise RuntimeError(f"{path} is not a valid SSCD TorchScript file ({error}); delete it and download again.") from error


def sscd_preprocess(images: torch.Tensor) -> torch.Tensor:
    """N x 3 x H x W in [0, 1] -> 320 x 320 (skew, no crop), ImageNet-normalised."""
    x = F.interpolate(images.float(), size=(320, 320), mode="bilinear", antialias=True, align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def sscd_scorer(model: torch.nn.Module):
    """A replication score from an SSCD model: cosine similarity of descriptors (generation vs reference)."""

    @torch.no_grad()
    def score(generated: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        device = next(model.parameters()).device if any(True for _ in model.parameters()) else "cpu"
        g = F.normalize(model(sscd_preprocess(generated).to(device)), dim=-1)
        r = F.normalize(model(sscd_preprocess(reference).to(device)), dim=-1)
        return (g @ r.T).max(dim=1).values.cpu()

    return score


def best_reference_score(score_fn, generated: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Per generation, the highest score against any of an item's reference images."""
    return torch.stack([score_fn(generated, ref[None]) for ref in references]).max(dim=0).values


def memorization_rate(scores: torch.Tensor, threshold: float) -> float:
    """MR from an items x seeds score matrix: share of items whose median score exceeds the threshold."""
    if scores.ndim != 2:
        raise ValueError(f"scores must be items x seeds, got shape {tuple(scores.shape)}")
    if scores.shape[0] == 0 or scores.shape[1] == 0:
        raise ValueError(f"scores must hold at least one item and one seed, got shape {tuple(scores.shape)}")
    if not torch.isfinite(torch.as_tensor(scores)).all():
        raise ValueError("scores hold NaN or infinite values, which would count as 'not replicated': check the "
                         "generations and the references they were scored against.")
    replicated = (median_score(scores) > threshold).sum().item()
    return replicated / len(scores)


def median_score(scores: torch.Tensor) -> torch.Tensor:
    """Per item, the median score over its seeds (items x seeds -> items). ``torch.median`` returns the lower of
    the two middle values, which would count an item with two seeds as replicated only when both replicate."""
    return scores.float().quantile(0.5, dim=1)


def roc_auc(positive_scores, negative_scores) -> float:
    """Area under the ROC curve for separating positives (memorized) from negatives by score."""
    from sklearn.metrics import roc_auc_score

    positive = torch.as_tensor(positive_scores).flatten().tolist()
    negative = torch.as_tensor(negative_scores).flatten().tolist()
    return float(roc_auc_score([1] * len(positive) + [0] * len(negative), positive + negative))
