"""Wanda pruning of memorization (Chavhan et al., 2024): zero feed-forward weights that memorized prompts rely on.

For each ``ff.net.2`` (the second linear of every transformer block's GEGLU feed-forward), per denoising step:

- ||X_j||_2: the norm of input feature j over all tokens of all prompts and both guidance branches, after
  normalising each token's feature vector to unit length;
- score S_ij = |W_ij| * ||X_j||_2, for the memorized prompts (target) and for the empty prompt (base);
- per output row, the top ``sparsity`` share of weights by target score, kept where target > base.

The union over the first ``union_steps`` denoising steps is zeroed. Chavhan et al. use 1% sparsity and the first
10 of 50 steps; the Dori paper adds 10% as an ablation. By default the union covers the same share of the
trajectory, the first fifth (``union_steps_for``): 10 of SD's 50 steps, 4 of the organism's 20. The timestep is told to the hooks by the sampling loop
(``on_step``), never inferred by counting hook calls.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict

import torch

from dori_utils import hooks
from dori_utils.sampling import generate


UNION_SHARE = 10 / 50  # Chavhan et al.: the first 10 of 50 denoising steps


def union_steps_for(num_inference_steps: int) -> int:
    """The first steps that cover Chavhan et al.'s share of the sampling trajectory (at least one)."""
    return max(1, round(UNION_SHARE * num_inference_steps))


def ff_layers(unet) -> list[str]:
    """Every ``ff.net.2`` in the UNet (SD v1.4: 16; the organism: 7), in forward order."""
    return hooks.layer_names(unet, "ff.net.2")


@torch.no_grad()
def input_norms(backend, embeddings: torch.Tensor, seeds: list[int], union_steps: int | None = None,
                layers: list[str] | None = None, **sampling_kwargs) -> dict[str, torch.Tensor]:
    """layer -> union_steps x in_features: ||X_j||_2 of the inputs of each ``ff.net.2`` at each early step (at
    most as many steps as sampling takes)."""
    layers = layers or ff_layers(backend.unet)
    steps = sampling_kwargs.get("num_inference_steps") or backend.num_inference_steps
    union_steps = min(union_steps_for(steps) if union_steps is None else union_steps, steps)
    sums: dict[str, dict[int, torch.Tensor]] = defaultdict(dict)
    current = {"step": 0}

    def on_step(step, _timestep):
        current["step"] = step

    def make_hook(name):
        def hook(_module, inputs):
            x = inputs[0].float().flatten(0, -2)
            x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-8)
            squares = x.pow(2).sum(0).cpu()
            step = current["step"]
            sums[name][step] = sums[name].get(step, 0) + squares
        return hook

    with hooks.forward_hooks(backend.unet, layers, make_hook, pre=True):
        generate(backend, embeddings, seeds, on_step=on_step, stop_after=union_steps, **sampling_kwargs)
    return {name: torch.stack([sums[name][s] for s in range(union_steps)]).sqrt() for name in layers}


def check_sparsity(sparsity) -> None:
    """A share of each output row's weights: strictly between 0 and 1 (0 would still prune one weight per row)."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 < sparsity < 1:
        raise ValueError(f"sparsity must be a share strictly between 0 and 1 (0.01 = 1%), got {sparsity!r}")


def select_weights(weight: torch.Tensor, target_norms: torch.Tensor, base_norms: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Boolean mask (out x in) for one layer: union over steps of the per-row top-`sparsity` target weights
    whose target score exceeds the base score."""
    check_sparsity(sparsity)
    w = weight.detach().abs().float().cpu()
    k = max(1, int(sparsity * w.shape[1]))
    mask = torch.zeros_like(w, dtype=torch.bool)
    for target, base in zip(target_norms, base_norms):
        s_target, s_base = w * target[None, :], w * base[None, :]
        top = torch.topk(s_target, k, dim=1).indices
        chosen = torch.zeros_like(mask).scatter_(1, top, True)
        mask |= chosen & (s_target > s_base)
    return mask


def pruning_masks(backend, target_embeddings: torch.Tensor, sparsity: float | list[float] = 0.01,
                 union_steps: int | None = None,
                 seeds: list[int] | None = None, **sampling_kwargs):
    """Wanda masks (layer -> bool out x in) for a set of target embeddings (the memorized prompts, or triggers).

    With a list of sparsities, one mask set per sparsity (``{sparsity: masks}``) from the same activation norms.
    """
    for share in (sparsity if isinstance(sparsity, (list, tuple)) else [sparsity]):
        check_sparsity(share)
    seeds = list(seeds) if seeds is not None else [0] * len(target_embeddings)
    base = backend.empty_embedding().expand(len(target_embeddings), -1, -1)
    target_norms = input_norms(backend, target_embeddings, seeds, union_steps, **sampling_kwargs)
    base_norms = input_norms(backend, base, seeds, union_steps, **sampling_kwargs)
    modules = hooks.modules_by_name(backend.unet, list(target_norms))
    several = isinstance(sparsity, (list, tuple))
    masks = {s: {name: select_weights(modules[name].weight, target_norms[name], base_norms[name], s) for name in target_norms}
             for s in (sparsity if several else [sparsity])}
    return masks if several else masks[sparsity]


def prune(backend, masks: dict[str, torch.Tensor]) -> contextlib.AbstractContextManager:
    """Context manager: the masked weights are zero while it is open and restored exactly afterwards."""
    return hooks.masked_weights(backend.unet, masks)


def prune_everything(backend) -> contextlib.AbstractContextManager:
    """Context manager: every ``ff.net.2`` weight is zero while it is open, the limit of Wanda's pruning (a model
    whose memorization needs its feed-forward output layers loses it here; one that does not keeps it)."""
    modules = hooks.modules_by_name(backend.unet, ff_layers(backend.unet))
    return prune(backend, {name: torch.ones_like(m.weight, dtype=torch.bool) for name, m in modules.items()})


def pruned_share(masks: dict[str, torch.Tensor]) -> float:
    """Share of the ff.net.2 weights that a mask set zeroes."""
    return sum(m.sum().item() for m in masks.values()) / sum(m.numel() for m in masks.values())
