"""What several chapters share, computed in one place and cached: NeMo's neurons (chapters 0-4) and the Dori
triggers of chapters 2-4, from one configuration.

A chapter's ``parameters`` cell has ``SHARED = {}``: overrides of :class:`SharedConfig` (a profile can set them,
e.g. ``SHARED: {n_random: 100}`` for the paper's 100 starts), and ``SMOKE = True`` shrinks every size first.
Two chapters that ask for the same run get the same cached result; a changed size computes a new one beside it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from dori_utils import nemo, results
from dori_utils.analysis import TriggerSet, collect_triggers
from dori_utils.backends import Backend


@dataclass(frozen=True)
class SharedConfig:
    n_statistics: int = 3000  # ordinary prompts for NeMo's activation statistics (NeMo on SD: 50,000)
    n_calibration: int = 100  # ordinary prompts that calibrate NeMo's threshold
    n_items: int = 3  # memorized items attacked for the triggers (the first of the backend's list)
    n_random: int = 6  # random starts per item (the paper: 100)
    n_prompt_starts: int = 2  # non-memorized prompts used as starts, per item
    attack_steps: int = 50  # the paper's budget
    eval_seeds: tuple[int, ...] = (20, 21)  # seeds that judge whether a trigger replicates


SMOKE_SIZES = {"n_statistics": 64, "n_calibration": 8, "n_items": 2, "n_random": 2, "n_prompt_starts": 1,
               "attack_steps": 3, "eval_seeds": (20,)}


def shared_config(smoke: bool = False, overrides: dict | None = None) -> SharedConfig:
    """The configuration in force: the defaults, then the smoke sizes when ``smoke``, then ``overrides``."""
    overrides = dict(overrides or {})
    unknown = set(overrides) - {f.name for f in dataclasses.fields(SharedConfig)}
    if unknown:
        raise ValueError(f"Unknown shared settings {sorted(unknown)}; the settings are "
                         f"{[f.name for f in dataclasses.fields(SharedConfig)]}")
    if "eval_seeds" in overrides:
        overrides["eval_seeds"] = tuple(overrides["eval_seeds"])
    return dataclasses.replace(SharedConfig(), **{**(SMOKE_SIZES if smoke else {}), **overrides})


def nemo_neurons(backend: Backend, config: SharedConfig, progress: bool = True):
    """NeMo on every memorized item of the backend, as its authors run it: (statistics, threshold, per-item
    results), cached under ``results/<backend>/cache``."""
    return nemo.find_neurons_cached(backend, backend.memorized, results.results_dir(backend.name) / "cache",
                                      config.n_statistics, config.n_calibration, progress=progress)


@dataclass
class TriggerExperiment:
    """The triggers of chapters 2-4: each of the first ``n_items`` images attacked under its own NeMo neurons from
    random starts and from non-memorized prompts."""

    backend: Backend
    config: SharedConfig
    items: list
    localized: list  # NeMo's result for each attacked item
    triggers: TriggerSet


def trigger_experiment(backend: Backend, config: SharedConfig, progress: bool = True) -> TriggerExperiment:
    """Find (or load from the cache) the triggers of chapters 2-4."""
    _, _, localized = nemo_neurons(backend, config, progress)
    items, localized = backend.memorized[: config.n_items], localized[: config.n_items]
    pool = backend.prompt_sets["nonmemorized"]
    start_prompts = list(np.random.default_rng(0).choice(pool, config.n_prompt_starts, replace=False))
    params = {**nemo.cache_key(backend, backend.memorized, config.n_statistics, config.n_calibration),
              "attacked": [item.id for item in items], "n_random": config.n_random, "start_prompts": start_prompts,
              "steps": config.attack_steps, "seeds": list(config.eval_seeds)}
    triggers = results.cached(
        results.results_dir(backend.name) / "cache", "triggers", params,
        lambda: collect_triggers(backend, items, nemo.per_item_blocking(backend, localized), config.n_random,
                                 start_prompts, config.attack_steps, config.eval_seeds, progress=progress))
    return TriggerExperiment(backend, config, items, localized, triggers)
