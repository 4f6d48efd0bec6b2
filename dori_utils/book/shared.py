"""What several chapters share, computed in one place and cached: the configuration of NeMo's run and of the
Dori triggers, NeMo's neurons (chapters 0-4), the items chapters 2-4 attack and their triggers.

A chapter's ``parameters`` cell has ``SHARED = {}``: overrides of :class:`SharedConfig` (a profile can set them,
e.g. ``SHARED: {n_random: 100}`` for the paper's 100 starts), and ``SMOKE = True`` shrinks every size first.
Two chapters that ask for the same run get the same cached result; a changed size computes a new one beside it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from dori_utils import nemo
from dori_utils.analysis import TriggerSet, collect_triggers
from dori_utils.backends import Backend
from dori_utils.book import results
from dori_utils.evaluation import evaluate_items
from dori_utils.metrics import median_score


@dataclass(frozen=True)
class SharedConfig:
    n_statistics: int = 3000  # ordinary prompts for NeMo's activation statistics (NeMo on SD: 50,000)
    n_calibration: int = 100  # ordinary prompts that calibrate NeMo's threshold
    n_items: int = 3  # memorized items attacked for the triggers: the first of those NeMo hides (choose_items)
    n_random: int = 6  # random starts per item (the paper: 100)
    n_prompt_starts: int = 2  # non-memorized prompts used as starts, per item
    attack_steps: int = 50  # the paper's budget
    eval_seeds: tuple[int, ...] = (20, 21)  # seeds that judge whether a trigger replicates
    hidden_seeds: tuple[int, ...] = (10, 11)  # chapter 1's seeds, which judge whether NeMo hides an item


SMOKE_SIZES = {"n_statistics": 64, "n_calibration": 8, "n_items": 2, "n_random": 2, "n_prompt_starts": 1,
               "attack_steps": 3, "eval_seeds": (20,),
               "hidden_seeds": (10,)}


def shared_config(smoke: bool = False, overrides: dict | None = None) -> SharedConfig:
    """The configuration in force: the defaults, then the smoke sizes when ``smoke``, then ``overrides``."""
    overrides = dict(overrides or {})
    unknown = set(overrides) - {f.name for f in dataclasses.fields(SharedConfig)}
    if unknown:
        raise ValueError(f"Unknown shared settings {sorted(unknown)}; the settings are "
                         f"{[f.name for f in dataclasses.fields(SharedConfig)]}")
    for seeds in ("eval_seeds", "hidden_seeds"):
        if seeds in overrides:
            overrides[seeds] = tuple(overrides[seeds])
    return dataclasses.replace(SharedConfig(), **{**(SMOKE_SIZES if smoke else {}), **overrides})


def sample_prompts(backend: Backend, prompt_set: str, n: int, seed: int) -> list[str]:
    """``n`` prompts of one of the backend's prompt sets, drawn without replacement (all of them if fewer)."""
    return sample_prompt_sets(backend, {prompt_set: n}, seed)[prompt_set]


def sample_prompt_sets(backend: Backend, sizes: dict[str, int], seed: int) -> dict[str, list[str]]:
    """Prompts of several of the backend's prompt sets (name -> how many), drawn in turn from one generator."""
    rng = np.random.default_rng(seed)
    drawn = {}
    for prompt_set, n in sizes.items():
        if prompt_set not in backend.prompt_sets:
            raise KeyError(f"The {backend.name} backend has no prompt set {prompt_set!r}; it has "
                           f"{sorted(backend.prompt_sets)}.")
        pool = backend.prompt_sets[prompt_set]
        if not len(pool):
            raise ValueError(f"The {backend.name} backend's prompt set {prompt_set!r} is empty.")
        drawn[prompt_set] = list(rng.choice(pool, min(n, len(pool)), replace=False))
    return drawn


def find_neurons_cached(backend, items, cache_dir, n_statistics: int = 3000, n_calibration: int = 100,
                        statistics: str | None = None, timestep: int | None = None, seed: int = 0,
                        progress: bool = False) -> nemo.NeuronSearch:
    """``nemo.find_neurons``, kept in ``cache_dir``: the statistics and threshold under ``cache_key`` (without the
    items), each item's localisation under that key plus the item, so that chapters with different item sets
    share what they have in common and a different run is stored beside it."""
    key = nemo.cache_key(backend, [], n_statistics, n_calibration, statistics, timestep, seed)
    del key["items"]
    activation_stats, threshold, _ = results.cached(
        cache_dir, "nemo-statistics", key,
        lambda: nemo.find_neurons(backend, [], n_statistics, n_calibration, seed, statistics, timestep))
    per_item = []
    for item in tqdm(items, desc="NeMo localisation", disable=not progress):
        per_item.append(results.cached(
            cache_dir, "nemo-item", {**key, "item": item.id, "prompt": item.prompt},
            lambda: nemo.localize(backend, backend.encode_prompts([item.prompt]), activation_stats, threshold,
                                  timestep=timestep)))
    return nemo.NeuronSearch(activation_stats, threshold, per_item)


def nemo_neurons(backend: Backend, config: SharedConfig, items=None, progress: bool = True) -> nemo.NeuronSearch:
    """NeMo as its authors run it, on ``items`` (default: every memorized item of the backend), cached per item
    under ``results/<backend>/cache`` so that every chapter shares the same statistics and localisations."""
    items = backend.memorized if items is None else items
    return find_neurons_cached(backend, items, results.results_dir(backend.name) / "cache",
                                    config.n_statistics, config.n_calibration, progress=progress)


@dataclass
class ItemSelection:
    """Which memorized items chapters 2-4 attack, and why: the paper studies images that pruning hid, so the
    first ``n_items`` of those NeMo hides; where it hides none, the first ``n_items`` of the backend's list."""

    hidden: list[str]  # items whose median score under their own NeMo neurons is at most the threshold
    chosen: list[str]
    n_memorized: int
    seeds: tuple[int, ...]

    def summary(self) -> dict:
        return {"hidden": ", ".join(self.hidden) or "none", "n_hidden": len(self.hidden),
                "chosen": ", ".join(self.chosen), "n_chosen": len(self.chosen), "n_memorized": self.n_memorized}

    def describe(self) -> str:
        how = (f"median replication score over seeds {', '.join(map(str, self.seeds))} under the item's own "
               f"neurons at or below the threshold, as in chapter 1")
        if not self.hidden:
            return (f"NeMo hides none of the {self.n_memorized} memorized images ({how}), so the attacked images "
                    f"are the first {len(self.chosen)}, which replicate under NeMo: {', '.join(self.chosen)}")
        return (f"NeMo hides {len(self.hidden)} of the {self.n_memorized} memorized images ({how}): "
                f"{', '.join(self.hidden)}; the attacked images are the first {len(self.chosen)} of them: "
                f"{', '.join(self.chosen)}")


def choose_items(backend: Backend, config: SharedConfig, neurons: nemo.NeuronSearch) -> tuple[list, ItemSelection]:
    """The items chapters 2-4 attack (see :class:`ItemSelection`), from ``neurons``, NeMo's result for every
    memorized item of the backend: each item generated from its prompt under its own neurons, as chapter 1
    measures NeMo."""
    items = backend.memorized
    if len(neurons.per_item) != len(items):
        raise ValueError(f"choose_items needs NeMo's result for all {len(items)} memorized items, got "
                         f"{len(neurons.per_item)}: pass nemo_neurons(backend, config)")
    params = {**nemo.cache_key(backend, items, config.n_statistics, config.n_calibration),
              "seeds": list(config.hidden_seeds)}
    scores = results.cached(
        results.results_dir(backend.name) / "cache", "nemo-hidden", params,
        lambda: evaluate_items(backend, list(config.hidden_seeds), items=items,
                               row_context=nemo.per_item_blocking(backend, neurons.per_item)).scores)
    hidden = [item for item, score in zip(items, median_score(scores).tolist())
              if score <= backend.replication_threshold]
    chosen = (hidden or items)[: config.n_items]
    return chosen, ItemSelection([item.id for item in hidden], [item.id for item in chosen], len(items),
                                 config.hidden_seeds)


@dataclass
class TriggerExperiment:
    """The triggers of chapters 2-4: each chosen image (``selection``) attacked under its own NeMo neurons from
    random starts and from non-memorized prompts."""

    backend: Backend
    config: SharedConfig
    items: list
    neurons: nemo.NeuronSearch  # NeMo's statistics, threshold and one result per attacked item
    triggers: TriggerSet
    selection: ItemSelection

    @property
    def localized(self) -> list:
        return self.neurons.per_item

    def neurons_of(self, item_id: str) -> dict[str, list[int]]:
        """The NeMo neurons blocked for one attacked item: the pruned model its triggers were found in."""
        ids = [item.id for item in self.items]
        if item_id not in ids:
            raise KeyError(f"{item_id!r} was not attacked; the attacked items are {ids}")
        return self.neurons.per_item[ids.index(item_id)].neurons


def trigger_experiment(backend: Backend, config: SharedConfig, progress: bool = True) -> TriggerExperiment:
    """Find (or load from the cache) the triggers of chapters 2-4."""
    if not backend.memorized:
        raise ValueError(f"The {backend.name} backend has no memorized items to attack; check its max_items.")
    every_item = nemo_neurons(backend, config, progress=progress)
    items, selection = choose_items(backend, config, every_item)
    by_id = dict(zip((item.id for item in backend.memorized), every_item.per_item))
    neurons = nemo.NeuronSearch(every_item.statistics, every_item.threshold, [by_id[item.id] for item in items])
    start_prompts = sample_prompts(backend, "nonmemorized", config.n_prompt_starts, seed=0)
    params = {**nemo.cache_key(backend, items, config.n_statistics, config.n_calibration),
              "n_random": config.n_random, "start_prompts": start_prompts,
              "steps": config.attack_steps, "seeds": list(config.eval_seeds)}
    triggers = results.cached(
        results.results_dir(backend.name) / "cache", "triggers", params,
        lambda: collect_triggers(backend, items, nemo.per_item_blocking(backend, neurons.per_item), config.n_random,
                                 start_prompts, config.attack_steps, config.eval_seeds, progress=progress))
    return TriggerExperiment(backend, config, items, neurons, triggers, selection)


def describe_triggers(experiment: TriggerExperiment) -> str:
    triggers = experiment.triggers
    return (f"{experiment.selection.describe()}.\n{len(triggers.triggers)} triggers for {len(experiment.items)} "
            f"memorized items ({triggers.replicates.sum().item()} replicate under NeMo's blocking); random starts "
            f"drawn with s = {experiment.backend.embedding_spread}")


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
