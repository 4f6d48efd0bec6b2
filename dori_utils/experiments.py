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
import torch

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


def sample_prompts(backend: Backend, prompt_set: str, n: int, seed: int) -> list[str]:
    """``n`` prompts of one of the backend's prompt sets, drawn without replacement (all of them if fewer)."""
    pool = backend.prompt_sets[prompt_set]
    if not len(pool):
        raise ValueError(f"The {backend.name} backend's prompt set {prompt_set!r} is empty.")
    return list(np.random.default_rng(seed).choice(pool, min(n, len(pool)), replace=False))


def nemo_neurons(backend: Backend, config: SharedConfig, items=None, progress: bool = True) -> nemo.NeuronSearch:
    """NeMo as its authors run it, on ``items`` (default: every memorized item of the backend), cached per item
    under ``results/<backend>/cache`` so that every chapter shares the same statistics and localisations."""
    items = backend.memorized if items is None else items
    return nemo.find_neurons_cached(backend, items, results.results_dir(backend.name) / "cache",
                                    config.n_statistics, config.n_calibration, progress=progress)


@dataclass
class TriggerExperiment:
    """The triggers of chapters 2-4: each of the first ``n_items`` images attacked under its own NeMo neurons from
    random starts and from non-memorized prompts."""

    backend: Backend
    config: SharedConfig
    items: list
    neurons: nemo.NeuronSearch  # NeMo's statistics, threshold and one result per attacked item
    triggers: TriggerSet

    @property
    def localized(self) -> list:
        return self.neurons.per_item


def trigger_experiment(backend: Backend, config: SharedConfig, progress: bool = True) -> TriggerExperiment:
    """Find (or load from the cache) the triggers of chapters 2-4."""
    if not backend.memorized:
        raise ValueError(f"The {backend.name} backend has no memorized items to attack; check its max_items.")
    items = backend.memorized[: config.n_items]
    neurons = nemo_neurons(backend, config, items, progress)
    start_prompts = sample_prompts(backend, "nonmemorized", config.n_prompt_starts, seed=0)
    params = {**nemo.cache_key(backend, items, config.n_statistics, config.n_calibration),
              "n_random": config.n_random, "start_prompts": start_prompts,
              "steps": config.attack_steps, "seeds": list(config.eval_seeds)}
    triggers = results.cached(
        results.results_dir(backend.name) / "cache", "triggers", params,
        lambda: collect_triggers(backend, items, nemo.per_item_blocking(backend, neurons.per_item), config.n_random,
                                 start_prompts, config.attack_steps, config.eval_seeds, progress=progress))
    return TriggerExperiment(backend, config, items, neurons, triggers)


def describe_triggers(experiment: TriggerExperiment) -> str:
    triggers = experiment.triggers
    return (f"{len(triggers.triggers)} triggers for {len(experiment.items)} memorized items "
            f"({triggers.replicates.sum().item()} replicate under NeMo's blocking); random starts drawn with "
            f"s = {experiment.backend.embedding_spread}")


def triggers_of_one_image(experiment: TriggerExperiment, limit: int | None = None):
    """The attacked item with the most replicating triggers, and those triggers (Y_adv of chapters 3 and 4).

    With fewer than two replicating triggers every attack result of that item is used, so that the analyses
    still have pairs to compare; the count of replicating ones says which case it is.
    """
    triggers = experiment.triggers
    counts = {item.id: len(triggers.of(item.id)) for item in experiment.items}
    item = max(experiment.items, key=lambda item: counts[item.id])
    return item, triggers.comparable(item.id)[:limit], counts[item.id]


def trigger_generations(experiment: TriggerExperiment, per_item: int = 6, seed: int | None = None):
    """Per attacked item: its training image and the generations of its first ``per_item`` triggers, under the
    item's NeMo blocking, with a caption (start kind, score) for each."""
    from dori_utils.sampling import generate

    triggers, backend = experiment.triggers, experiment.backend
    seed = experiment.config.eval_seeds[0] if seed is None else seed
    rows, captions = [], []
    for item, localized in zip(experiment.items, experiment.localized):
        chosen = [j for j, x in enumerate(triggers.item_ids) if x == item.id][:per_item]
        with torch.no_grad(), nemo.block(backend, localized.neurons):
            images = generate(backend, triggers.triggers[chosen], [seed] * len(chosen)).images
        rows.append([item.references[0], *images])
        captions.append(["", *(f"{triggers.start_kinds[j][:6]} {triggers.scores[j]:.2f}" for j in chosen)])
    return rows, captions
