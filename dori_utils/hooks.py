"""Forward hooks as context managers. Layers are addressed by their diffusers module names.

Every context manager removes its hooks (or restores its weights) on exit, also after an exception.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Callable

import torch


def modules_by_name(model: torch.nn.Module, names) -> dict[str, torch.nn.Module]:
    """Look up modules by name; an unknown name raises a KeyError that lists similar names."""
    named = dict(model.named_modules())
    missing = [n for n in names if n not in named]
    if missing:
        suffix = missing[0].rsplit(".", 1)[-1]
        known = [n for n in named if n.endswith(suffix)][:8]
        raise KeyError(f"No module named {missing[0]!r} in {type(model).__name__}; modules ending in {suffix!r}: {known}")
    return {n: named[n] for n in names}


def layer_names(unet: torch.nn.Module, suffix: str, blocks: tuple[str, ...] = ("down_blocks", "mid_block", "up_blocks")) -> list[str]:
    """Names of modules ending in `suffix` (e.g. ``attn2.to_v``) inside the given UNet blocks, in forward order:
    down blocks, then the mid block, then the up blocks (diffusers registers the up blocks before the mid block,
    so registration order is not forward order)."""
    forward = ("down_blocks", "mid_block", "up_blocks")
    unknown = [b for b in blocks if b not in forward]
    if unknown:
        raise ValueError(f"unknown UNet block group(s) {unknown}; choose from {forward}")
    names = [n for n, _ in unet.named_modules() if n.endswith(suffix)]
    return [n for group in forward if group in blocks for n in names if n.split(".", 1)[0] == group]


@contextlib.contextmanager
def forward_hooks(model: torch.nn.Module, names, make_hook: Callable[[str], Callable], pre: bool = False):
    """Register ``make_hook(name)`` on each named module (a forward hook, or with ``pre`` a forward pre-hook) for
    the block, and remove every one on exit, also after an exception: the one place hooks are registered."""
    handles = []
    try:
        for name, module in modules_by_name(model, names).items():
            register = module.register_forward_pre_hook if pre else module.register_forward_hook
            handles.append(register(make_hook(name)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def zero_output_channels(model: torch.nn.Module, channels: dict[str, torch.Tensor | list[int]]):
    """Multiply the given output channels of each named Linear by 0, for every token and every batch row.

    Rows of the batch include both classifier-free-guidance branches, so both are blocked (as NeMo does).
    """
    def make_hook(name):
        index = torch.as_tensor(channels[name], dtype=torch.long)

        def hook(_module, _inputs, output):
            output = output.clone()
            output[..., index.to(output.device)] = 0
            return output
        return hook

    with forward_hooks(model, [n for n, idx in channels.items() if len(idx)], make_hook):
        yield


@contextlib.contextmanager
def scale_output_channels(model: torch.nn.Module, scales: dict[str, torch.Tensor]):
    """Multiply each named module's output by ``scales[name]``: batch rows x channels, one row of channel
    factors per row of the batch. With 0/1 factors, different rows of one batch block different channels
    (NeMo's per-prompt neurons for several prompts at once)."""
    def make_hook(name):
        def hook(_module, _inputs, output):
            scale = scales[name]
            if output.shape[0] != scale.shape[0] or output.shape[-1] != scale.shape[1]:
                raise ValueError(f"{name}: scales are {tuple(scale.shape)} (rows x channels), but the batch "
                                 f"gives an output of {tuple(output.shape)}")
            view = (scale.shape[0],) + (1,) * (output.ndim - 2) + (scale.shape[1],)
            return output * scale.to(output.device, output.dtype).view(view)
        return hook

    with forward_hooks(model, list(scales), make_hook):
        yield


@contextlib.contextmanager
def capture_outputs(model: torch.nn.Module, names: list[str], detach: bool = True):
    """Record each named module's output on every forward call: ``{name: [tensor, ...]}``."""
    records: dict[str, list[torch.Tensor]] = defaultdict(list)

    def make_hook(name):
        return lambda _module, _inputs, output: records[name].append(output.detach() if detach else output)

    with forward_hooks(model, names, make_hook):
        yield records


@contextlib.contextmanager
def capture_inputs(model: torch.nn.Module, names: list[str], detach: bool = True):
    """Record the first positional input of each named module on every forward call."""
    records: dict[str, list[torch.Tensor]] = defaultdict(list)

    def make_hook(name):
        return lambda _module, inputs: records[name].append(inputs[0].detach() if detach else inputs[0])

    with forward_hooks(model, names, make_hook, pre=True):
        yield records


@contextlib.contextmanager
def masked_weights(model: torch.nn.Module, masks: dict[str, torch.Tensor]):
    """Zero the weights where ``masks[name]`` is True, and restore the exact original values on exit."""
    modules = modules_by_name(model, list(masks))
    saved = {}
    try:
        with torch.no_grad():
            for name, module in modules.items():
                mask = masks[name].to(module.weight.device, torch.bool)
                if mask.shape != module.weight.shape:
                    raise ValueError(f"Mask for {name} has shape {tuple(mask.shape)}, weight has {tuple(module.weight.shape)}")
                saved[name] = module.weight[mask].clone()
                module.weight[mask] = 0
        yield
    finally:
        with torch.no_grad():
            for name, values in saved.items():
                module = modules[name]
                module.weight[masks[name].to(module.weight.device, torch.bool)] = values
