"""What several chapters share, computed in one place and cached: NeMo's neurons (chapters 0-4) and the Dori
triggers of chapters 2-4, from one configuration.

A chapter's ``parameters`` cell has ``SHARED = {}``: overrides of :class:`SharedConfig` (a profile can set them,
e.g. ``SHARED: {n_random: 100}`` for the paper's 100 starts), and ``SMOKE = True`` shrinks every size first.
Two chapters that ask for the same run get the same cached result; a changed size computes a new one beside it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from dori_utils import attack, nemo, wanda
from dori_utils.book import results
from dori_utils.analysis import TriggerSet, collect_triggers
from dori_utils.attack import AttackResult
from dori_utils.backends import Backend
from dori_utils.evaluation import ItemEvaluation, evaluate_items
from dori_utils.metrics import median_score, memorization_rate


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


# ------------------------------------------------------------------- chapter 0: the model and its memorization

def control_generations(backend: Backend, sizes: list[int], seed: int = 0, progress: bool = True):
    """Chapter 0's control sets, prompts that memorize nothing: the backend's ``control_sets`` (label -> prompt
    set, in order; the organism: held-out scene captions, unseen natural captions; SD: non-memorized LAION
    prompts), the i-th drawn to ``sizes[i]`` prompts, each generated with seed 0. Returns (label -> prompts,
    label -> samples); the first set calibrates the threshold."""
    from dori_utils.sampling import generate_for_prompts

    sets = list(backend.control_sets.items())[: len(sizes)]
    if not sets:
        raise ValueError(f"The {backend.name} backend names no control prompt sets (Backend.control_sets).")
    drawn = sample_prompt_sets(backend, {name: n for (_, name), n in zip(sets, sizes)}, seed)
    prompts = {label: drawn[name] for label, name in sets}
    return prompts, {label: generate_for_prompts(backend, p, [0], progress=progress) for label, p in prompts.items()}


def training_pair_counts(samples) -> pd.DataFrame:
    """How many training pairs of each kind, and how many distinct captions among them."""
    counts = pd.Series([s.kind for s in samples]).value_counts().rename("pairs").to_frame()
    counts["distinct captions"] = [len({s.caption for s in samples if s.kind == kind}) for kind in counts.index]
    return counts


def utility_table(backend: Backend, prompts: list[str], generated: torch.Tensor) -> pd.DataFrame:
    """The backend's utility measure, part by part, on generations for ``prompts``; beside it, where the backend
    can draw what a prompt depicts, the same measure on those drawings (it validates the measure itself)."""
    if backend.utility_parts is None:
        raise ValueError(f"The {backend.name} backend has no utility measure to break down.")
    columns = {}
    if backend.draw_prompts is not None:
        columns["real scenes (checker validation)"] = backend.utility_parts(backend.draw_prompts(prompts), prompts)
    columns["generated from held-out captions"] = backend.utility_parts(generated, prompts)
    return pd.DataFrame(columns)


def seen_caption_utility(backend: Backend, n: int, seed: int = 4) -> tuple[float, int]:
    """The utility on ``n`` ordinary scenes seen in training, each captioned in full (does the model compose, or
    only recall?), and n."""
    from dori_utils.sampling import generate_for_prompts

    # a sample's item is its scene's full caption: where training captions leave out part of the scene, the checker
    # still needs every attribute named
    seen = sorted({s.item for s in backend.training_samples() if s.kind == "ordinary"})
    prompts = list(np.random.default_rng(seed).choice(seen, min(n, len(seen)), replace=False))
    return backend.utility(generate_for_prompts(backend, prompts, [0]).images, prompts), len(prompts)


def memorization_checks(mr: float, margin: float, heldout: str, aucs: dict[str, float],
                        attribute_accuracy: float | None = None) -> dict[str, bool]:
    """Chapter 0: is this a model that memorizes the way the paper's does? The memorized prompts replicate (MR at
    least 0.9), nothing else does (``margin``: the threshold minus the highest score of any other generation),
    Wen's detector separates them from each control (AUC at least 0.95, as on SD), and, where the backend measures
    it, held-out captions keep their attributes (at least 0.7)."""
    checks = {f"MR of memorized prompts >= 0.9 ({mr:.1f})": mr >= 0.9,
              f"no generation of {heldout} or of another memorized caption reaches the threshold (margin "
              f"{margin:.2f})": margin > 0,
              **{f"Wen AUC >= 0.95 vs {label} ({auc:.2f})": auc >= 0.95 for label, auc in aucs.items()}}
    if attribute_accuracy is not None:
        checks[f"attribute accuracy on held-out captions >= 0.7 ({attribute_accuracy:.2f})"] = attribute_accuracy >= 0.7
    return checks


def first_sampling_step(backend: Backend) -> tuple[int, float]:
    """The sampler's first timestep and the share of a training image's signal that survives there
    (sqrt of alpha-bar): sampling starts from pure noise, so this should be about zero."""
    backend.scheduler.set_timesteps(backend.num_inference_steps)
    first = int(backend.scheduler.timesteps[0])
    return first, backend.scheduler.alphas_cumprod[first].sqrt().item()


@dataclass
class LocalityTest:
    """Blocking value neurons in z-score order until each memorized photograph stops coming back."""

    item_ids: list[str]
    needed: list[int]  # neurons blocked before the item stopped replicating (n_value: never; 0: never replicated)
    nemo_counts: list[int]  # the size of NeMo's own selection, per item
    transfer: torch.Tensor  # [i, j]: item j's score with item i's needed neurons blocked
    n_value: int
    utility: dict[str, float]  # on held-out prompts, unblocked and with one item's neurons blocked
    threshold: float

    def table(self) -> pd.DataFrame:
        n = len(self.item_ids)
        stopped = [sum(int(self.transfer[i, j] <= self.threshold) for j in range(n) if j != i) for i in range(n)]
        return pd.DataFrame({"item": self.item_ids, "NeMo's selection": self.nemo_counts,
                             "neurons to block": self.needed,
                             "share of value neurons": [k / self.n_value for k in self.needed],
                             "other memorized prompts stopped": stopped})

    def summary(self) -> dict:
        replicating = [k for k in self.needed if k > 0]
        shares = [k / self.n_value for k in replicating]
        return {"neurons_needed": dict(zip(self.item_ids, self.needed)), "value_neurons": self.n_value,
                "transfer_scores": self.transfer.tolist(), "attribute_accuracy": self.utility,
                "replicating": len(replicating), "stopped": sum(k < self.n_value for k in replicating),
                "median_share": float(np.median(shares)) if shares else None,
                # over the items NeMo selected any neurons for (an item it does not flag gets none)
                "nemo_min": min((n for n in self.nemo_counts if n), default=0), "nemo_max": max(self.nemo_counts)}

    def checks(self) -> dict[str, bool]:
        summary = self.summary()
        replicating = [k for k in self.needed if k > 0]
        # Only "a few" is a claim: blocking every value neuron leaves no text path, so "blocking stops it" alone
        # could not fail.
        shares = [k / self.n_value for k in replicating]
        return {f"a few neurons (under 10% of the value neurons) stop each replicating photograph (z-order "
                f"shares {min(shares, default=float('nan')):.0%}-{max(shares, default=float('nan')):.0%}, "
                f"{summary['stopped']} of {summary['replicating']} stopped)":
                    bool(shares) and all(share < 0.1 for share in shares)}


def locality_test(backend: Backend, neurons: nemo.NeuronSearch, prompts: list[str], unblocked: torch.Tensor,
                  seeds=(0,), per_item: int = 8) -> LocalityTest:
    """The bluntest test of locality: per memorized item, the fewest value neurons (in z-score order) whose
    blocking stops its replication; whether that blocking stops the other items too; and what it costs ordinary
    prompts (``per_item`` of ``prompts`` generated under each item's blocking, beside ``unblocked``, their
    unblocked generations; needs a utility measure)."""
    from dori_utils.sampling import generate

    items = backend.memorized
    needed = nemo.neurons_needed(backend, items, neurons.statistics, seeds=seeds)
    blocked = [selection for _, selection in needed]
    transfer = nemo.cross_item_blocking(backend, items, blocked, seeds=seeds)
    utility = {}
    if backend.utility is not None:
        per_item = min(per_item, len(prompts) // len(items))
        if per_item == 0:
            raise ValueError(f"locality_test needs at least one held-out prompt per memorized item ({len(items)}), "
                             f"got {len(prompts)}")
        owner = torch.arange(len(items)).repeat_interleave(per_item)
        blocking = nemo.per_item_blocking(backend, blocked)
        damaged = generate(backend, backend.encode_prompts(prompts[: len(owner)]), [0] * len(owner),
                           row_context=lambda rows: blocking(owner[rows])).images
        utility = {"unblocked": backend.utility(unblocked[: len(owner)], prompts[: len(owner)]),
                   "one item's neurons blocked": backend.utility(damaged, prompts[: len(owner)])}
    return LocalityTest([item.id for item in items], [k for k, _ in needed], [r.count for r in neurons.per_item],
                        transfer, neurons.n_value_neurons, utility, backend.replication_threshold)


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


# Claim checks of chapters 2-4: each states the paper's direction and prints NO where the numbers go against it.

def spread_checks(spread: dict) -> dict[str, bool]:
    """Chapter 2 (``analysis.spread_summary``): triggers of one image lie further apart than two unrelated
    prompts (the paper: larger), and each stays nearer its own start than the memorized prompt."""
    medians = spread["median_distances"]
    return {f"triggers of one image lie further apart than two unrelated prompts (median ratio "
            f"{spread['ratio_to_unrelated']:.2f}; the paper: larger than 1)": spread["ratio_to_unrelated"] > 1,
            f"triggers stay nearer their start than the memorized prompt (median distances "
            f"{medians['trigger to its start']:.1f} and {medians['trigger to its memorized prompt']:.1f})":
                medians["trigger to its start"] < medians["trigger to its memorized prompt"]}


LAYER_SET_NAMES = {"nemo": "NeMo's value layers (attn2.to_v outputs)",
                   "cross_attention": "the cross-attention layers (attn2 outputs)",
                   "wanda": "Wanda's layers (ff.net.2 inputs)"}


def divergence_checks(discrepancy: dict, paper_rows: dict) -> dict[str, bool]:
    """Chapter 3, the paper's direction: in every layer, the triggers of one image diverge at least as much as
    different memorized prompts (Y_adv >= Y_mem). ``discrepancy``: layer set -> DataFrame with columns Y_adv and
    Y_mem; ``paper_rows``: layer set -> (Y_adv, Y_mem) series read from the paper's figure, where it has them.
    Each line gives the paper's count beside ours (in Wanda's layers the paper itself has Y_adv below Y_mem in
    most layers)."""
    from dori_utils.analysis import layers_diverging

    checks = {}
    for layers, frame in discrepancy.items():
        ours, n = layers_diverging(frame["Y_adv"], frame["Y_mem"])
        paper_count = ("the paper: {} of {}".format(*layers_diverging(*paper_rows[layers])) if layers in paper_rows
                       else "not measured in the paper")
        checks[f"Y_adv >= Y_mem in each of {LAYER_SET_NAMES.get(layers, layers)}: {ours} of {n} "
               f"({paper_count})"] = ours == n
    return checks


def selection_checks(iou_by_set: dict, transfer: dict, threshold: float, bar: float = 0.6) -> dict[str, bool | None]:
    """Chapter 4: Wanda's selections for triggers of one image overlap less than ``bar`` on average (the paper:
    below 0.6 in most layers); and, where a trigger's own NeMo selection stops it (the diagonal of
    ``analysis.transfer_summary``), that selection stops fewer than half of the other triggers. Where no
    selection stops its own trigger, transfer cannot test locality: ``None``, said in the line."""
    wanda_iou = iou_by_set[("wanda", "Y_adv")]
    checks = {f"Wanda's selections for triggers of one image overlap less than {bar} on average (IoU "
              f"{wanda_iou:.2f})": wanda_iou < bar}
    own, n = transfer["own_stopped"], transfer["n"]
    label = "a trigger's own NeMo selection, where it stops that trigger, stops fewer than half of the others"
    if transfer["effective_stopped_share"] is None:
        checks[f"{label}: not testable, no trigger's own selection stops it (scores {transfer['diagonal_min']:.2f}-"
               f"{transfer['diagonal_max']:.2f}, threshold {threshold})"] = None
    else:
        share = transfer["effective_stopped_share"]
        checks[f"{label} ({own} of {n} stop their own; those stop {share:.0%} of the others)"] = share < 0.5
    return checks


def nemo_flagging_rate(backend: Backend, neurons: nemo.NeuronSearch, prompts: list[str]) -> float:
    """The share of ``prompts`` that NeMo's detection flags as memorized, with ``neurons``' threshold at NeMo's
    timestep: the base rate beside the triggers it flags."""
    if not prompts:
        raise ValueError("nemo_flagging_rate needs at least one prompt")
    embeddings = backend.encode_prompts(prompts)
    return float(np.mean([nemo.detect(backend, e[None], neurons.threshold).memorized for e in embeddings]))


# ------------------------------------------------------------------------------------------------------------
# Chapter 1: pruning and the attack
# ------------------------------------------------------------------------------------------------------------

def wanda_setting(sparsity: float) -> str:
    """The name a Wanda pruning goes by in the tables and the results ("Wanda 1%"), as the paper's table names it."""
    return f"Wanda {sparsity:.0%}"


def pruning_settings(sparsities: list[float]) -> list[str]:
    """The rows of chapter 1's table, in the paper's order: the baselines, the controls (the paper's, then the
    never-seen images it does not have), then each pruning without and with the attack."""
    prunings = ["NeMo", *(wanda_setting(s) for s in sparsities)]
    return ["memorized prompts", *(f"{control}{suffix}" for control in CONTROL_SETTINGS for suffix in ("", " + Dori")),
            *(f"{name}{suffix}" for name in prunings for suffix in ("", " + Dori"))]


@dataclass
class PrunedAttack:
    """One pruning and the Dori attack on it: the memorized prompts generated under the pruning, the attack run
    under it from those prompts, and what the embeddings it found generate under it."""

    name: str  # the setting, as the paper's table names it ("NeMo", "Wanda 1%")
    items: list
    pruned: ItemEvaluation
    attack: AttackResult
    attacked: ItemEvaluation
    # how the pruning is applied: one context for every prompt (Wanda's masks; opened afresh on each call) or a
    # row context that gives each item its own neurons (NeMo)
    context: Callable[[], contextlib.AbstractContextManager] | None = None
    row_context: Callable | None = None
    zeroed_share: float | None = None  # Wanda: the share of the pruned layers' weights set to zero

    def under_pruning(self) -> dict:
        """``evaluate_items``' keywords that generate under this pruning."""
        return {"context": self.context()} if self.context is not None else {"row_context": self.row_context}

    def evaluations(self) -> dict[str, ItemEvaluation]:
        """The two rows of the table this run fills: the pruning alone, and the pruning attacked."""
        return {self.name: self.pruned, f"{self.name} + Dori": self.attacked}


def _first_references(items) -> torch.Tensor:
    return torch.cat([item.references[:1] for item in items])


CONTROL_SETTINGS = {"non-memorized prompts": "images seen once in training", "never-seen images": "never-seen images"}


def non_memorized_controls(backend: Backend, seeds: list[int], n: int, steps: int = 50,
                           seed: int = 1) -> dict[str, ItemEvaluation]:
    """The attack's controls, each generated from its caption and then attacked with the memorized items' budget
    (the attack should not paint them): ``n`` images the model saw in training without memorizing them
    (``backend.seen_once_items``: the paper's "non-memorized prompts", LAION images SD saw), and ``n`` images it
    never saw (``backend.never_seen_items``). A kind the backend does not have is left out."""
    rows = {}
    for setting, controls in (("non-memorized prompts", backend.seen_once_items()[:n]),
                              ("never-seen images", backend.never_seen_items()[:n])):
        if not controls:
            continue
        captions = backend.encode_prompts([control.prompt for control in controls])
        found = attack.dori_attack(backend, _first_references(controls), captions, steps=steps, seed=seed)
        rows[setting] = evaluate_items(backend, seeds, captions, items=controls)
        rows[f"{setting} + Dori"] = evaluate_items(backend, seeds, found.embeddings, items=controls)
    return rows


def nemo_attack(backend: Backend, items, neurons: nemo.NeuronSearch, seeds: list[int], steps: int = 50,
                snapshot_steps: tuple[int, ...] = (), seed: int = 0) -> PrunedAttack:
    """NeMo as it is meant to be used, every prompt under its own neurons, and the attack on that model."""
    return blocked_attack(backend, items, "NeMo", neurons.per_item, seeds, steps, snapshot_steps, seed)


def blocked_attack(backend: Backend, items, name: str, selections: list, seeds: list[int], steps: int = 50,
                   snapshot_steps: tuple[int, ...] = (), seed: int = 0) -> PrunedAttack:
    """Every prompt under its own blocked value neurons (``selections``: one ``NemoResult`` or ``{layer:
    [channel, ...]}`` per item), and the attack on that model; all prompts go through one batch
    (``nemo.per_item_blocking``)."""
    blocking = nemo.per_item_blocking(backend, selections)
    prompts = backend.encode_prompts([item.prompt for item in items])
    pruned = evaluate_items(backend, seeds, prompts, items=items, row_context=blocking)
    found = attack.dori_attack(backend, _first_references(items), prompts, steps=steps,
                               snapshot_steps=snapshot_steps, seed=seed, row_context=blocking)
    attacked = evaluate_items(backend, seeds, found.embeddings, items=items, row_context=blocking)
    return PrunedAttack(name, list(items), pruned, found, attacked, row_context=blocking)


def wanda_attacks(backend: Backend, items, sparsities: list[float], seeds: list[int], steps: int = 50,
                  snapshot_steps: tuple[int, ...] = (), seed: int = 2,
                  union_steps: int | None = None) -> dict[float, PrunedAttack]:
    """Wanda's one mask for all memorized prompts at each sparsity (one pass over the prompts for all of them,
    scoring the first ``union_steps`` denoising steps, by default Chavhan et al.'s first fifth of the trajectory),
    and the attack on each pruned model."""
    prompts = backend.encode_prompts([item.prompt for item in items])
    runs = {}
    masks_by_sparsity = wanda.pruning_masks(backend, prompts, sparsity=list(sparsities), union_steps=union_steps)
    for sparsity, masks in masks_by_sparsity.items():
        with wanda.prune(backend, masks):
            pruned = evaluate_items(backend, seeds, prompts, items=items)
            found = attack.dori_attack(backend, _first_references(items), prompts, steps=steps,
                                       snapshot_steps=snapshot_steps, seed=seed)
            attacked = evaluate_items(backend, seeds, found.embeddings, items=items)
        runs[sparsity] = PrunedAttack(wanda_setting(sparsity), list(items), pruned, found, attacked,
                                      context=lambda masks=masks: wanda.prune(backend, masks),
                                      zeroed_share=wanda.pruned_share(masks))
    return runs


def mr_by_attack_step(backend: Backend, run: PrunedAttack, steps: tuple[int, ...], seed: int) -> list[float]:
    """MR of the attack's embeddings after each of ``steps`` attack steps, under the run's pruning, judged on one
    seed: the first of the run's evaluation seeds (``seed``), whose generations at the start and at the last
    step are reused; the snapshots between are generated."""
    last = len(run.attack.losses)
    scores = {0: run.pruned.scores[:, :1], last: run.attacked.scores[:, :1]}
    missing = [step for step in steps if step not in scores and step not in run.attack.snapshots]
    if missing:
        raise ValueError(f"The attack kept no snapshot after steps {missing}; "
                         f"run it with snapshot_steps={tuple(steps)}")
    for step in steps:
        if step not in scores:
            scores[step] = evaluate_items(backend, [seed], run.attack.snapshots[step], items=run.items,
                                          **run.under_pruning()).scores
    return [memorization_rate(scores[step], backend.replication_threshold) for step in steps]


def nemo_items(items, neurons: nemo.NeuronSearch, pruned: ItemEvaluation | None = None) -> list[dict]:
    """Per item, what NeMo found: whether detection flagged it, its scores, the neurons it selected, and whether
    its own blocking test passed at NeMo's threshold or only at the relaxed one (NeMo's fallback: when no θ level
    gets under the threshold, the last score becomes the refinement threshold). With ``pruned`` (the items
    generated under their own neurons), beside it the median replication score and whether the image is hidden."""
    rows = []
    for i, (item, found) in enumerate(zip(items, neurons.per_item)):
        flagged = found.memorized
        row = {"item": item.id, "flagged": flagged, "detection score": found.unblocked_score,
               "seeds kept": len(found.kept_seeds),
               "neurons (initial)": sum(map(len, found.initial_neurons.values())),
               "neurons (refined)": found.count, "blocking score": found.refined_score if flagged else None,
               "refinement threshold": found.refinement_threshold if flagged else None,
               "NeMo's test passed": flagged and found.refined_score <= neurons.threshold}
        if pruned is not None:
            score = median_score(pruned.scores[i : i + 1]).item()
            row.update({"median score under NeMo": score, "hidden": score <= pruned.threshold})
        rows.append(row)
    return rows


def nemo_items_table(rows: list[dict]) -> pd.DataFrame:
    """:func:`nemo_items` as the chapter shows it, narrow enough for the page: per item, the neurons NeMo kept,
    its blocking score against the threshold it was held to, whether its own test passed, and whether the image
    is hidden."""
    columns = {"item": "item", "neurons (refined)": "neurons", "blocking score": "blocking score",
               "refinement threshold": "refinement threshold", "NeMo's test passed": "test passed",
               "median score under NeMo": "score under NeMo", "hidden": "hidden"}
    frame = pd.DataFrame(rows)
    return frame[[c for c in columns if c in frame.columns]].rename(columns=columns)


def nemo_hidden_counts(rows: list[dict]) -> dict:
    """From :func:`nemo_items` rows made with the pruned evaluation: how many items NeMo's own test passed for, how
    many images are hidden, and for how many both hold."""
    return {"n_hidden": sum(row["hidden"] for row in rows), "n_passed": sum(row["NeMo's test passed"] for row in rows),
            "n_passed_and_hidden": sum(row["hidden"] and row["NeMo's test passed"] for row in rows)}


def nemo_summary(items, neurons: nemo.NeuronSearch) -> dict:
    """What chapter 1's text says about NeMo's selections: how many items it flags, how many neurons it picks,
    and whether blocking them gets the first-step prediction under the threshold (NaN where nothing is flagged)."""
    flagged = [(item, found) for item, found in zip(items, neurons.per_item) if found.memorized]
    counts = [found.count for _, found in flagged]
    under = [item.id for item, found in flagged if found.refined_score <= neurons.threshold]
    over = [found.refined_score for _, found in flagged if found.refined_score > neurons.threshold]
    union = nemo.union([found.neurons for found in neurons.per_item])
    nan = float("nan")
    return {"n_items": len(items), "n_flagged": len(flagged),
            "not_flagged": ", ".join(item.id for item, found in zip(items, neurons.per_item) if not found.memorized)
            or "none",
            "value_neurons": neurons.n_value_neurons, "threshold": neurons.threshold,
            "neurons_min": min(counts, default=0), "neurons_max": max(counts, default=0),
            "share_min": min(counts, default=0) / neurons.n_value_neurons,
            "share_max": max(counts, default=0) / neurons.n_value_neurons,
            "n_under_threshold": len(under), "under_threshold": ", ".join(under) or "none",
            "n_over_threshold": len(over), "over_threshold_min": min(over, default=nan),
            "over_threshold_max": max(over, default=nan),
            "union_neurons": sum(len(channels) for channels in union.values())}


def describe_nemo(backend: Backend, neurons: nemo.NeuronSearch) -> str:
    """NeMo's threshold and timestep here beside its settings on SD v1.4, and the neurons it searches."""
    from dori_utils.book import paper

    return (f"NeMo: threshold {neurons.threshold:.3f} (NeMo on SD v1.4: {paper.number('nemo.threshold').value}), "
            f"timestep {nemo.detection_timestep(backend)} (SD v1.4: {paper.number('nemo.timestep').value:.0f}), "
            f"{neurons.n_value_neurons} value neurons in {len(neurons.statistics.mean)} layers")


def displacement_summary(runs: list[PrunedAttack], between_prompts: torch.Tensor) -> dict:
    """How far each attack moved its embeddings (median ||y_adv - y_0||), beside the median distance between two
    ordinary prompts, and the ratio of the two. Keys: ``<name>_median`` and ``<name>_ratio`` per run, the name in
    lower case ("nemo", "wanda"), and ``between_prompts_median``."""
    between = between_prompts.median().item()
    summary = {}
    for run in runs:
        key = run.name.split()[0].lower()
        if f"{key}_median" in summary:
            raise ValueError(f"Two runs of {run.name.split()[0]}: pass one run per method")
        moved = run.attack.displacement.median().item()
        summary.update({f"{key}_median": moved, f"{key}_ratio": moved / between})
    return {**summary, "between_prompts_median": between}


def utility_under_pruning(backend: Backend, prompts: list[str], neurons: nemo.NeuronSearch,
                          wanda_runs) -> dict[str, float]:
    """The backend's utility measure on ``prompts`` (one generation each, seed 0): unmitigated, with the union of
    every item's NeMo neurons blocked (NeMo blocks one prompt's neurons at a time, so this is what they do to
    everything else), and under each of ``wanda_runs``' masks (global by design)."""
    from dori_utils.sampling import generate_for_prompts

    if backend.utility is None:
        raise ValueError(f"The {backend.name} backend has no utility measure.")
    union = nemo.union([found.neurons for found in neurons.per_item])
    prunings = {"unmitigated": contextlib.nullcontext,
                "NeMo (union of all items' neurons)": lambda: nemo.block(backend, union),
                **{run.name: run.context for run in wanda_runs}}
    utility = {}
    for name, pruning in prunings.items():
        with pruning(), torch.no_grad():
            images = generate_for_prompts(backend, prompts, [0]).images
        utility[name] = backend.utility(images, prompts)
    return utility


def pruning_claim_checks(recorded: dict, sparsity: float) -> dict[str, bool | None]:
    """The paper's first claim, part by part, on chapter 1's recorded summaries (keyed by setting): each pruning
    lowers MR, and the attack raises it again; and, for each control that ran, the attack does not make its images
    replicate (the paper: MR 0.00 for images SD saw without memorizing them)."""
    mr = {setting: summary["mr"] for setting, summary in recorded.items()
          if isinstance(summary, dict) and "mr" in summary}
    wanda_name = wanda_setting(sparsity)
    checks = {}
    for pruning in ("NeMo", wanda_name):
        lowers = mr[pruning] < mr["memorized prompts"]
        checks[f"{pruning} lowers MR ({mr['memorized prompts']:.1f} -> {mr[pruning]:.1f})"] = lowers
        # recovery only means something where the pruning hid something
        recovery = (f"Dori recovers after {pruning} (MR {mr[f'{pruning} + Dori']:.1f})" if lowers
                    else f"Dori recovers after {pruning}: not testable, {pruning} did not lower MR")
        checks[recovery] = mr[f"{pruning} + Dori"] > mr[pruning] if lowers else None
    for control, label in CONTROL_SETTINGS.items():
        if f"{control} + Dori" in mr:
            attacked = mr[f"{control} + Dori"]
            checks[f"the attack does not bring back {label} (MR {attacked:.2f} after the attack, at most 0.25; "
                   f"the paper: 0.00)"] = attacked <= 0.25
    return checks


# ---------------------------------------------------------------------------------------------------------------
# Chapter 5: adversarial fine-tuning
# The method is dori_utils.finetune; here is what the chapter runs with it: its sizes, the three fine-tunings, the
# fresh attack that judges them, and the rows, grids and checks it shows.

@dataclass
class FinetuningPlan:
    """Chapter 5's sizes, after the smoke sizes were applied (see :func:`finetuning_plan`)."""

    seeds: list[int]  # evaluation seeds
    max_items: int | None  # memorized items fine-tuned against
    surrogate_source: str  # "transformed" (the training image mirrored, flipped or rotated) or "pruned" (the paper's)
    surrogate_levels: list  # "pruned": [Wanda sparsity, all value neurons blocked], mildest first
    surrogate_max_score: float
    surrogate_seeds: list[int]
    n_pairs: int  # L_DM pairs
    n_utility: int  # held-out prompts for the utility check
    eval_attack_steps: int  # the fresh attack's steps
    eval_attack_seed: int
    eval_random_items: int  # items also attacked from fresh random starts
    finetune: "FinetuneConfig"

    @property
    def updates(self) -> int:
        """UNet updates per fine-tuning."""
        return self.finetune.epochs * self.finetune.steps_per_epoch


FINETUNING_SMOKE_SIZES = {"max_items": 2, "n_pairs": 64, "n_utility": 8, "eval_attack_steps": 3,
                          "epochs": 1, "steps_per_epoch": 2, "attack_steps": 2, "dm_batch": 4, "adv_batch": 4}


SURROGATE_SOURCES = ("transformed", "pruned")


def finetuning_plan(smoke: bool, *, seeds, max_items, surrogate_source, surrogate_levels, surrogate_max_score,
                    surrogate_seeds,
                    n_pairs, n_utility, eval_attack_steps, eval_attack_seed, eval_random_items,
                    **finetune_settings) -> FinetuningPlan:
    """The chapter's parameters as one plan; ``finetune_settings`` are :class:`~dori_utils.finetune.FinetuneConfig`
    fields. ``smoke`` keeps one evaluation seed and two surrogate seeds and shrinks the sizes to
    ``FINETUNING_SMOKE_SIZES``, so that the chapter runs in seconds."""
    from dori_utils.finetune import FinetuneConfig

    sizes = {"max_items": max_items, "n_pairs": n_pairs, "n_utility": n_utility,
             "eval_attack_steps": eval_attack_steps, **finetune_settings}
    if smoke:
        seeds, surrogate_seeds = list(seeds)[:1], list(surrogate_seeds)[:2]
        sizes.update(FINETUNING_SMOKE_SIZES)
    if surrogate_source not in SURROGATE_SOURCES:
        raise ValueError(f"SURROGATES must be one of {SURROGATE_SOURCES}, got {surrogate_source!r}")
    plan = {key: sizes.pop(key) for key in ("max_items", "n_pairs", "n_utility", "eval_attack_steps")}
    return FinetuningPlan(list(seeds), surrogate_source=surrogate_source, surrogate_levels=[list(level) for level in surrogate_levels],
                          surrogate_max_score=surrogate_max_score, surrogate_seeds=list(surrogate_seeds),
                          eval_attack_seed=eval_attack_seed, eval_random_items=eval_random_items,
                          finetune=FinetuneConfig(**sizes), **plan)


def chapter_surrogates(backend: Backend, items, plan: FinetuningPlan):
    """The plan's surrogates: ``finetune.transformed_surrogates``, or ``finetune.pruned_surrogates`` for the plan's
    levels and seeds, cached under ``results/<backend>/cache`` (keyed by the UNet's weights, so a retrained model
    draws new ones)."""
    from dori_utils import finetune

    if plan.surrogate_source == "transformed":
        return finetune.transformed_surrogates(backend, items, plan.surrogate_max_score)
    params = {"model": finetune.weights_fingerprint(backend.unet), "items": [item.id for item in items],
              "levels": plan.surrogate_levels, "seeds": plan.surrogate_seeds, "max_score": plan.surrogate_max_score}
    return results.cached(results.results_dir(backend.name) / "cache", "surrogates", params,
                          lambda: finetune.pruned_surrogates(backend, items, plan.surrogate_levels,
                                                             plan.surrogate_seeds, plan.surrogate_max_score))


def surrogate_summary(surrogates) -> dict:
    """What the prose says about the surrogates: how each was made and how many, their scores, and how many stay
    above the ceiling and above the replication threshold."""
    scores = surrogates.scores
    counts = {name: surrogates.source.count(name) for name in dict.fromkeys(surrogates.source)}
    return {"n_items": len(scores), "source": list(surrogates.source), "seeds": list(surrogates.seeds),
            "scores": scores.tolist(), "mean_score": scores.mean().item(), "min_score": scores.min().item(),
            "max_score": scores.max().item(), "ceiling": surrogates.max_score, "threshold": surrogates.threshold,
            "source_counts": counts, "sources": ", ".join(f"{name} ({count})" for name, count in counts.items()),
            "n_above_ceiling": int((scores > surrogates.max_score).sum()),
            "n_above_threshold": int((scores > surrogates.threshold).sum())}


def surrogate_grid(items, surrogates) -> dict:
    """``plots.image_grid`` arguments: the training images above their surrogates, each captioned with its
    replication score and how it was made."""
    captions = [f"{score:.2f}, {source}" for score, source in zip(surrogates.scores.tolist(), surrogates.source)]
    return {"rows": [[item.references[0] for item in items], list(surrogates.images)],
            "row_labels": ["training image", "surrogate"], "col_labels": [item.id for item in items],
            "captions": [[""] * len(items), captions]}


def ldm_pairs(backend: Backend, n_pairs: int, seed: int = 3):
    """The L_DM data: the backend's own non-memorized training pairs where the book has them (a random subset of
    ``n_pairs``), otherwise the original model's generations for ``n_pairs`` non-memorized prompts
    (self-distillation: it keeps the model close to what it did on ordinary prompts)."""
    from dori_utils import finetune
    from dori_utils.sampling import generate_for_prompts

    if backend.training_samples is not None:
        return finetune.organism_pairs(backend, max_pairs=n_pairs)
    prompts = sample_prompts(backend, "nonmemorized", n_pairs, seed=seed)
    return finetune.make_pairs(backend, generate_for_prompts(backend, prompts, [0]).images, prompts)


@dataclass(frozen=True)
class FinetuneVariant:
    """One of the chapter's fine-tunings: its cache folder, what it changes in the configuration, and where the
    fresh attack starts against it."""

    folder: str
    changes: dict
    attack_starts: tuple[str, ...]


# The control is attacked from the prompt only, where forgetting would show.
FINETUNE_VARIANTS = {
    "adversarial fine-tuning": FinetuneVariant("adversarial", {}, ("prompt", "random")),
    "fine-tuning, prompt only": FinetuneVariant("prompt_only", {"use_triggers": False}, ("prompt", "random")),
    "fine-tuning, L_DM only": FinetuneVariant("L_DM_only", {"adv_batch": 0}, ("prompt",)),
}
# Before fine-tuning the prompt replicates by itself; only random starts need the attack.
ORIGINAL_MODEL = "before fine-tuning"
ORIGINAL_ATTACK_STARTS = ("random",)


def finetune_variants(backend: Backend, items, surrogates, pairs, config, progress: bool = False) -> dict:
    """The three fine-tunings of :data:`FINETUNE_VARIANTS` with the same updates, data and seed, each saved under
    ``results/<backend>/cache/finetuned/<folder>`` and reused while its settings and source are unchanged.

    Each finished model leaves memory until all three are trained and is then loaded back from its folder: two
    finished UNets beside a training copy, its gradients and the original would crowd a 16 GB GPU (at SD v1.4's
    size in float16 they hold 3.4 GB)."""
    from dori_utils import finetune

    source = {"weights": finetune.weights_fingerprint(backend.unet), "items": [item.id for item in items],
              "surrogates": finetune.tensor_fingerprint(surrogates.images), "pairs": len(pairs)}
    finished, folders = {}, {}
    for name, variant in FINETUNE_VARIANTS.items():
        run_config = dataclasses.replace(config, **variant.changes)
        folders[name] = results.results_dir(backend.name) / "cache" / "finetuned" / variant.folder
        run = finetune.finetune_cached(
            backend, folders[name], {"config": dataclasses.asdict(run_config), **source},
            lambda: finetune.adversarial_finetune(backend, items, surrogates.images, pairs, run_config,
                                                  progress=progress))
        finished[name] = dataclasses.replace(run, backend=None)
        del run
        gc.collect()  # a fine-tuned UNet can sit in a reference cycle; free it before the next training
    return {name: dataclasses.replace(run, backend=finetune.load_finetuned(backend, folders[name]).backend)
            for name, run in finished.items()}


def finetune_settings_table(config, pairs) -> pd.DataFrame:
    """The fine-tuning settings in force, one row per setting (a single row of 17 columns was wider than the page)."""
    settings = pd.Series(dataclasses.asdict(config)).drop(["use_triggers", "seed"])
    settings["L_DM pairs"] = len(pairs)
    return settings.astype(str).rename_axis("setting").to_frame("value")


def finetuning_cost(runs: dict) -> tuple[pd.DataFrame, dict]:
    """Wall time per epoch and in total for each run (of the run that made it, when it came from the cache), and
    per run its total and the attack's share of it."""
    first = next(iter(runs.values()))
    epochs = len(first.history["epoch_seconds"])
    table = pd.DataFrame({name: run.history["epoch_seconds"] for name, run in runs.items()},
                         index=[f"epoch {i + 1}" for i in range(epochs)])
    table.loc["total"] = [run.history["total_seconds"] for run in runs.values()]
    record = {name: {"total_seconds": run.history["total_seconds"],
                     "attack_share": sum(run.history.get("attack_seconds", [])) / run.history["total_seconds"],
                     "machine": run.history.get("machine", {})} for name, run in runs.items()}
    return table, record


def random_start_setting(name: str) -> str:
    return f"{name} + Dori, random starts"


@dataclass
class FreshAttack:
    """The test of chapter 5: a new Dori attack (a seed training never used) against each model."""

    no_attack: object  # ItemEvaluation of the original model from the prompts
    attacked: dict  # (model name, "prompt" | "random") -> ItemEvaluation
    n_random: int  # items also attacked from fresh random starts
    seconds: float

    def mr(self, name: str, start: str) -> float:
        """MR of a model under the attack from one kind of start, rounded as the checks print it."""
        return round(self.attacked[name, start].mr, 2)

    def summaries(self) -> dict:
        """Setting -> score mean, sd, MR and item count; the setting names are those of ``paper.NUMBERS``
        ("memorized prompts": the original model, no attack)."""
        rows = {"memorized prompts": self.no_attack}
        for (name, start), evaluation in self.attacked.items():
            rows[f"{name} + Dori" if start == "prompt" else random_start_setting(name)] = evaluation
        return {setting: {**evaluation.summary(), "n_items": len(evaluation.ids)} for setting, evaluation in rows.items()}


def fresh_attack(models: dict, items, plan: FinetuningPlan, random_seed: int = 99) -> FreshAttack:
    """Attack each model afresh (``plan.eval_attack_steps`` Adam steps, seed ``plan.eval_attack_seed``) from the
    prompts and, for the first ``plan.eval_random_items`` items, from random starts drawn with ``random_seed``
    (training drew its own with another), each model's starts in one attack; then sample each trigger with the
    evaluation seeds and score it against the training image."""
    import time

    from dori_utils import attack
    from dori_utils.evaluation import evaluate_items

    started = time.time()
    original = models[ORIGINAL_MODEL]
    prompts = original.encode_prompts([item.prompt for item in items])
    targets = torch.cat([item.references[:1] for item in items])
    n_random = min(plan.eval_random_items, len(items))
    starts = {"prompt": (prompts, items), "random": (attack.random_embeddings(original, n_random, seed=random_seed),
                                                     items[:n_random])}
    no_attack = evaluate_items(original, plan.seeds, prompts, items=items)
    attacked = {}
    for name, model in models.items():
        kinds = ORIGINAL_ATTACK_STARTS if name == ORIGINAL_MODEL else FINETUNE_VARIANTS[name].attack_starts
        sizes = [len(starts[kind][1]) for kind in kinds]
        found = attack.dori_attack(model, torch.cat([targets[:size] for size in sizes]),
                                   torch.cat([starts[kind][0] for kind in kinds]), steps=plan.eval_attack_steps,
                                   seed=plan.eval_attack_seed)
        for kind, triggers in zip(kinds, found.embeddings.split(sizes)):
            attacked[name, kind] = evaluate_items(model, plan.seeds, triggers, items=starts[kind][1])
    return FreshAttack(no_attack, attacked, n_random, time.time() - started)


def fresh_attack_grid(items, surrogates, fresh: FreshAttack) -> dict:
    """``plots.image_grid`` arguments: per item, the training image, its surrogate, the original model's
    generation from the prompt and each fine-tuned model's from the fresh attack's trigger (first seed), each
    with its replication score."""
    tuned = list(FINETUNE_VARIANTS)
    rows, captions = [], []
    for i, item in enumerate(items):
        evaluations = [fresh.no_attack] + [fresh.attacked[name, "prompt"] for name in tuned]
        rows.append([item.references[0], surrogates.images[i], *(e.images[i, 0] for e in evaluations)])
        captions.append(["", f"{surrogates.scores[i]:.2f}", *(f"{e.scores[i, 0]:.2f}" for e in evaluations)])
    return {"rows": rows, "row_labels": [item.id for item in items], "captions": captions,
            "col_labels": ["training image", "surrogate", "before (prompt)", "adversarial FT + Dori",
                           "prompt-only FT + Dori", "L_DM-only FT + Dori"]}


CHAPTER1_SETTINGS = ("NeMo + Dori", "Wanda 1% + Dori")


def pruning_results(backend_name: str, smoke: bool) -> dict:
    """Chapter 1's NeMo + Dori and Wanda 1% + Dori summaries on this backend (``ch1_pruning.json``), the pruning
    baselines fine-tuning is compared with. Stops with :class:`results.ResultsMissing` where chapter 1 has not run
    the same way (backend, smoke or not) or stopped before recording both."""
    recorded = results.read_results("ch1_pruning", backend_name, smoke, required=CHAPTER1_SETTINGS)
    return {setting: recorded[setting] for setting in CHAPTER1_SETTINGS}


PAPER_ONLY_SETTINGS = ("ESD + Dori", "Concept Ablation + Dori", "SISS + Dori")


def finetuning_table(summaries: dict, chapter1: dict) -> pd.DataFrame:
    """Every model under the fresh attack beside the paper's fine-tuning table, with chapter 1's pruning baselines
    and the mitigations only the paper ran."""
    from dori_utils.book import paper

    ours = {**summaries, **chapter1}
    sources = {"memorized prompts": "this chapter, before fine-tuning, no attack",
               **{setting: "chapter 1" for setting in CHAPTER1_SETTINGS},
               **{setting: "paper only" for setting in PAPER_ONLY_SETTINGS}}
    settings = [*summaries, *CHAPTER1_SETTINGS, *PAPER_ONLY_SETTINGS]
    return paper.beside_paper(ours, settings, sources)


def prompt_attack_settings() -> list[str]:
    """The settings attacked from the prompt, in the order the MR figure shows them."""
    return ["memorized prompts", *(f"{name} + Dori" for name in FINETUNE_VARIANTS), *CHAPTER1_SETTINGS]


def utility_of_models(models: dict, prompts: list[str], seed: int = 0) -> tuple[dict, dict | None]:
    """Each model's generations for ``prompts`` (one seed) and, where the backend has a utility measure, its
    value per model (None otherwise)."""
    from dori_utils.sampling import generate_for_prompts

    images = {name: generate_for_prompts(model, prompts, [seed]).images for name, model in models.items()}
    original = models[ORIGINAL_MODEL]
    if original.utility is None:
        return images, None
    return images, {name: original.utility(generated, prompts) for name, generated in images.items()}


def utility_drops(original: Backend, images: dict, prompts: list[str]) -> dict[str, dict]:
    """Per model besides the original: its utility on ``prompts`` and the mean per-caption drop from the original
    model's (same prompts, same seed), with the standard error of that paired drop, so that a drop is read against
    its noise."""
    if original.utility is None:
        raise ValueError(f"The {original.name} backend has no utility measure.")
    if len(prompts) < 2:
        raise ValueError("utility_drops needs at least two prompts to estimate the noise of a drop")
    per_caption = {name: np.array([original.utility(image[None], [prompt]) for image, prompt in zip(generated, prompts)])
                   for name, generated in images.items()}
    base = per_caption[ORIGINAL_MODEL]
    return {name: {"utility": float(values.mean()), "drop": float((base - values).mean()),
                   "se": float((base - values).std(ddof=1) / np.sqrt(len(values)))}
            for name, values in per_caption.items() if name != ORIGINAL_MODEL}


def utility_drop_table(drops: dict, utility: dict, utility_name: str) -> pd.DataFrame:
    """:func:`utility_drops` as the chapter shows it, one row per fine-tuned model, the original model's utility in
    the column header."""
    return pd.DataFrame(drops).T.rename(columns={
        "utility": utility_name, "drop": f"drop from the original ({utility[ORIGINAL_MODEL]:.2f})",
        "se": "standard error of the drop"})


def describe_fresh_attack(fresh: FreshAttack, chapter1: dict) -> str:
    """The MR lines above the claim checks: the original model from the prompt, each model under the fresh
    attack from each kind of start, and chapter 1's pruning baselines."""
    from dori_utils.book import paper

    lines = [f"MR of the prompt before fine-tuning, no attack: {fresh.no_attack.mr:.2f} "
             f"(paper: {paper.number('memorized prompts.mr').value:.2f})"]
    for start, label in (("prompt", "the prompt"), ("random", f"fresh random starts ({fresh.n_random} items)")):
        models = [name for name, kind in fresh.attacked if kind == start]
        lines.append(f"MR under Dori from {label}: " + "; ".join(f"{name} {fresh.mr(name, start):.2f}" for name in models))
    for setting in CHAPTER1_SETTINGS:
        lines.append(f"MR {setting} (chapter 1): " + (f"{chapter1[setting]['mr']:.2f}" if setting in chapter1 else "missing"))
    return "\n".join(lines)


def finetuning_checks(fresh: FreshAttack, surrogates, chapter1: dict, utility: dict | None = None,
                      utility_name: str = "utility", margin: float = 0.1) -> dict[str, bool]:
    """Chapter 5's claims: the surrogates are no copies, adversarial fine-tuning stops the fresh attack (MR at most
    ``margin``) from both kinds of start and beats NeMo + Dori (where chapter 1 ran), it beats the ablation and the
    control (the attack in the loop is what works), and (where the backend measures it) each fine-tuning keeps the
    utility."""
    adversarial, prompt_only, ldm_only = FINETUNE_VARIANTS
    starts = {"prompt": "the prompt", "random": f"fresh random starts ({fresh.n_random} items)"}
    checks = {"no surrogate is a replication": surrogates.all_below_threshold,
              f"every surrogate scores below {surrogates.max_score}": surrogates.all_below_max}
    for start, label in starts.items():
        checks[f"adversarial fine-tuning stops Dori from {label} (MR <= {margin})"] = fresh.mr(adversarial, start) <= margin
    if "NeMo + Dori" in chapter1:
        checks["adversarial fine-tuning + Dori beats NeMo + Dori"] = (
            fresh.mr(adversarial, "prompt") < round(chapter1["NeMo + Dori"]["mr"], 2))
    # The paper's direction: the attack in the loop is what makes the fix (lower MR than without it, by more
    # than the margin, from at least one kind of start), not fine-tuning as such or forgetting.
    checks[f"adversarial fine-tuning beats the prompt-only ablation (MR lower by more than {margin}, from the prompt "
           f"or from random starts)"] = any(
        fresh.mr(prompt_only, start) > fresh.mr(adversarial, start) + margin for start in starts)
    checks[f"adversarial fine-tuning beats continued training on ordinary pairs alone (L_DM only) from the prompt "
           f"(MR lower by more than {margin})"] = fresh.mr(ldm_only, "prompt") > fresh.mr(adversarial, "prompt") + margin
    for name in FINETUNE_VARIANTS if utility else ():
        checks[f"{name} keeps {utility_name} within {margin}"] = utility[ORIGINAL_MODEL] - utility[name] <= margin
    return checks
