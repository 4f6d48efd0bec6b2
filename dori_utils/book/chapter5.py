"""Chapter 5, adversarial fine-tuning. The method is ``dori_utils.finetune``; here is what the chapter runs with
it: its sizes, the three fine-tunings, the fresh attack that judges them, and the rows, grids and checks it shows."""
from __future__ import annotations

import dataclasses
import gc
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from dori_utils.backends import Backend
from dori_utils.book import results
from dori_utils.book.shared import sample_prompts
from dori_utils.finetune import FinetuneConfig


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
    finetune: FinetuneConfig

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


# The chapter's parameters cell, name by name: the plan's field each sets, then FinetuneConfig's. Profiles set these
# names, so they stay as the chapter spells them; this table is the one place that maps them.
PLAN_PARAMETERS = {"SEEDS": "seeds", "MAX_ITEMS": "max_items", "SURROGATES": "surrogate_source",
                   "SURROGATE_LEVELS": "surrogate_levels", "SURROGATE_MAX_SCORE": "surrogate_max_score",
                   "SURROGATE_SEEDS": "surrogate_seeds", "N_PAIRS": "n_pairs", "N_UTILITY": "n_utility",
                   "EVAL_ATTACK_STEPS": "eval_attack_steps", "EVAL_ATTACK_SEED": "eval_attack_seed",
                   "EVAL_RANDOM_ITEMS": "eval_random_items"}
FINETUNE_PARAMETERS = {"EPOCHS": "epochs", "STEPS_PER_EPOCH": "steps_per_epoch",
                       "TRIGGERS_PER_ITEM": "triggers_per_item", "RANDOM_STARTS": "random_starts",
                       "TRAIN_ATTACK_STEPS": "attack_steps", "TRAIN_ATTACK_BATCH": "attack_batch",
                       "ATTACK_CHUNK": "attack_chunk", "DM_BATCH": "dm_batch", "ADV_BATCH": "adv_batch",
                       "LEARNING_RATE": "lr", "OPTIMIZER": "optimizer", "GRADIENT_CHECKPOINTING": "gradient_checkpointing"}


def plan_from_parameters(parameters: dict) -> FinetuningPlan:
    """The chapter's plan from its parameters cell (pass ``globals()``): ``SMOKE`` and every name of
    ``PLAN_PARAMETERS`` and ``FINETUNE_PARAMETERS``."""
    names = ["SMOKE", *PLAN_PARAMETERS, *FINETUNE_PARAMETERS]
    missing = [name for name in names if name not in parameters]
    if missing:
        raise KeyError(f"Chapter 5's parameters cell lacks {missing}: restore them (defaults in the chapter).")
    return finetuning_plan(parameters["SMOKE"], **{field: parameters[name] for name, field in PLAN_PARAMETERS.items()},
                           **{field: parameters[name] for name, field in FINETUNE_PARAMETERS.items()}, seed=0)


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
