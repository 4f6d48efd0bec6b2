"""The forward process and what the UNet predicts, for either parametrisation of a diffusers scheduler.

Stable Diffusion v1.4 predicts the noise (``prediction_type="epsilon"``); the organism predicts the velocity
v = sqrt(abar) eps - sqrt(1 - abar) x0 (``"v_prediction"``), which stays informative at the last timestep of a
zero-terminal-SNR schedule, where a noise prediction is the input itself. Training, the Dori attack and
fine-tuning all regress the UNet's output on ``prediction_target``, so each method works on both backends.
"""
from __future__ import annotations

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction")


def prediction_type(scheduler) -> str:
    kind = scheduler.config.prediction_type
    if kind not in PREDICTION_TYPES:
        raise ValueError(f"Unsupported prediction_type {kind!r} in the scheduler config; use one of {PREDICTION_TYPES}.")
    return kind


def _abar(scheduler, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return scheduler.alphas_cumprod.to(like.device)[t.to(like.device)].view(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def add_noise(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps."""
    a = _abar(scheduler, t, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def prediction_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the UNet is trained to output for x_t = add_noise(x0, noise, t): eps, or v."""
    if prediction_type(scheduler) == "epsilon":
        return noise
    a = _abar(scheduler, t, x0)
    return a.sqrt() * noise - (1 - a).sqrt() * x0


def predicted_noise(scheduler, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The noise the UNet's output implies at x_t. For v-prediction, eps = sqrt(abar) v + sqrt(1 - abar) x_t."""
    if prediction_type(scheduler) == "epsilon":
        return model_output
    a = _abar(scheduler, t, x_t)
    return a.sqrt() * model_output + (1 - a).sqrt() * x_t
