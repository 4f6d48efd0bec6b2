"""What a chapter costs on Stable Diffusion v1.4: count the UNet rows a run makes, then estimate GPU time and memory.

A run on a tiny SD-1.x pipeline makes the same UNet and VAE calls, with the same numbers of rows, as a run of
Stable Diffusion v1.4 with the same parameters: only the size of each row differs. ``count_model_calls`` tallies
those calls by phase (NeMo, Dori, fine-tuning ...), mode (forward only; backward to the input embedding; backward
to the weights), dtype and gradient checkpointing; ``estimate`` turns a tally into hours and peak memory on a GPU
from SD v1.4's FLOPs and saved activations per row, measured once below. Estimates, not measurements: the
efficiency is one public sampling benchmark's, and nothing here has run on the GPUs it names.
"""
from __future__ import annotations

import contextlib
import inspect
import sys
import weakref
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dori_utils import analysis, attack, evaluation, finetune, nemo, sampling, sd, wanda
from dori_utils.book import shared

# Stable Diffusion v1.4's UNet (CompVis/stable-diffusion-v1-4, unet/config.json), to measure it without downloading
# it; the rest are diffusers defaults that match it (32 groups, SiLU).
SD_V1_4_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)

# Counted with torch.utils.flop_counter.FlopCounterMode on the meta device, one row (64 x 64 x 4 latents, 77 x 768
# text): a forward pass, the backward pass to the text embedding only (the attack, NeMo's search uses none), and
# the backward pass that also forms weight gradients (fine-tuning). Checkpointing recomputes one forward.
UNET_TFLOP = {"forward": 0.803, "embedding-grad": 0.803 + 0.866, "weight-grad": 0.803 + 1.606}
VAE_TFLOP = {"decode": 2.51, "encode": 1.12}  # one 512 x 512 image, counted the same way
PARAMETERS = {"unet": 859.5e6, "vae": 83.7e6, "text_encoder": 123.1e6}
# Saved activations per row in GB, float32, counted on the meta device with saved-tensor hooks (each storage once),
# less the attention matrices that memory-efficient attention (T4, A100) never stores; with checkpointing, the
# blocks' inputs plus the largest block's activations, recomputed in the backward pass. Half precision halves them.
# A forward pass without gradients saves nothing; 0.25 GB per row for its transient tensors is a guess.
ACTIVATION_GB = {("embedding-grad", False): 4.78, ("weight-grad", False): 5.38,
                 ("embedding-grad", True): 1.33, ("weight-grad", True): 1.50, ("forward", False): 0.25,
                 ("forward", True): 0.25}

# Dense peak TFLOP/s by dtype; fine-tuning trains a float32 copy and runs at the float32 rate.
GPUS = {
    "T4": {"memory_gb": 15.0, "tflops": {"float16": 65.0, "bfloat16": None, "float32": 8.1}},
    "A100": {"memory_gb": 40.0, "tflops": {"float16": 312.0, "bfloat16": 312.0, "float32": 19.5}},
}
# SD v1.5 sampling at 512 px on an A100 runs at 31.19 it/s (fal-ai/stable-diffusion-benchmarks, diffusers, fp16):
# about 50 TFLOP/s, 16% of the fp16 peak. Every estimate assumes that share, for every phase and GPU.
EFFICIENCY = 0.16

# A call's phase is what the chapter was doing when it made it: of these functions on the stack, the one listed
# first (reference images inside an evaluation are reference images; an attack inside fine-tuning is fine-tuning).
# The functions themselves, not their names: a renamed function fails here, at import, instead of moving its cost.
PHASES = {
    "reference images": (sd.reference_generations,),
    "fine-tuning": (finetune.adversarial_finetune, finetune.make_surrogates, finetune.make_pairs),
    "NeMo statistics": (nemo.activation_statistics, nemo.calibrate_threshold),
    "NeMo": (nemo.detect, nemo.localize, nemo.neurons_needed, nemo.cross_item_blocking, nemo.find_neurons,
             shared.nemo_neurons),
    "Dori": (attack.dori_attack, attack.denoising_loss, analysis.collect_triggers),
    "Wanda": (wanda.input_norms, wanda.pruning_masks),
    "activations": (analysis.layer_activations, analysis.activation_divergence),
    "sampling and evaluation": (sampling.generate, evaluation.evaluate_items, sampling.generate_for_prompts),
}


def phase_ranks(phases: dict) -> dict:
    """Each phase function's code object (under its decorators) -> the rank of its phase."""
    return {inspect.unwrap(function).__code__: rank for rank, functions in enumerate(phases.values())
            for function in functions}


_RANK = phase_ranks(PHASES)
_PHASE_NAMES = list(PHASES)


def _phase() -> str:
    best, frame = len(_PHASE_NAMES), sys._getframe(1)
    while frame is not None:
        best = min(best, _RANK.get(frame.f_code, best))
        frame = frame.f_back
    return _PHASE_NAMES[best] if best < len(_PHASE_NAMES) else "other"


@dataclass
class CallTally:
    rows: int = 0
    calls: int = 0
    max_rows_per_call: int = 0
    max_live_unets: int = 0
    # the live UNets' bytes per parameter, summed (a float16 base model beside a float32 copy in training: 2 + 4):
    # what their weights hold, whatever their dtype, at the most crowded call
    max_live_unet_bytes: int = 0


@dataclass
class ModelCalls:
    """UNet rows by (phase, mode, dtype, checkpointing); VAE images by (phase, "decode" or "encode", dtype)."""
    unet: dict = field(default_factory=lambda: defaultdict(CallTally))
    vae: dict = field(default_factory=lambda: defaultdict(int))

    def to_dict(self) -> dict:
        return {"unet": [{"phase": p, "mode": m, "dtype": d, "checkpointing": c, **vars(t)}
                         for (p, m, d, c), t in self.unet.items()],
                "vae": [{"phase": p, "kind": k, "dtype": d, "images": n} for (p, k, d), n in self.vae.items()]}

    @classmethod
    def from_dict(cls, record: dict) -> "ModelCalls":
        calls = cls()
        for row in record["unet"]:
            key = (row["phase"], row["mode"], row["dtype"], row["checkpointing"])
            calls.unet[key] = CallTally(row["rows"], row["calls"], row["max_rows_per_call"], row["max_live_unets"],
                                        row["max_live_unet_bytes"])
        for row in record["vae"]:
            calls.vae[(row["phase"], row["kind"], row["dtype"])] = row["images"]
        return calls


def _mode(unet: torch.nn.Module, inputs) -> str:
    if not torch.is_grad_enabled():
        return "forward"
    if any(p.requires_grad for p in unet.parameters()):
        return "weight-grad"
    return "embedding-grad" if any(isinstance(x, torch.Tensor) and x.requires_grad for x in inputs) else "forward"


@contextlib.contextmanager
def count_model_calls():
    """Tally every ``UNet2DConditionModel`` and ``AutoencoderKL`` call made inside the block (all instances, patched
    at class level and restored on exit); yields the ``ModelCalls`` being filled."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    calls, live = ModelCalls(), weakref.WeakSet()
    unet_forward, decode, encode = UNet2DConditionModel.forward, AutoencoderKL.decode, AutoencoderKL.encode

    def counted_forward(self, sample, timestep, encoder_hidden_states, *args, **kwargs):
        live.add(self)
        key = (_phase(), _mode(self, (sample, encoder_hidden_states)), _dtype_name(self),
               bool(self.is_gradient_checkpointing))
        tally = calls.unet[key]
        tally.rows += len(sample)
        tally.calls += 1
        tally.max_rows_per_call = max(tally.max_rows_per_call, len(sample))
        tally.max_live_unets = max(tally.max_live_unets, len(live))
        tally.max_live_unet_bytes = max(tally.max_live_unet_bytes, sum(unet.dtype.itemsize for unet in live))
        return unet_forward(self, sample, timestep, encoder_hidden_states, *args, **kwargs)

    def counted(method, kind):
        def wrapper(self, x, *args, **kwargs):
            calls.vae[(_phase(), kind, _dtype_name(self))] += len(x)
            return method(self, x, *args, **kwargs)
        return wrapper

    UNet2DConditionModel.forward = counted_forward
    AutoencoderKL.decode, AutoencoderKL.encode = counted(decode, "decode"), counted(encode, "encode")
    try:
        yield calls
    finally:
        UNet2DConditionModel.forward, AutoencoderKL.decode, AutoencoderKL.encode = unet_forward, decode, encode


def extrapolate_calls(small: ModelCalls, large: ModelCalls, n_small: int, n_large: int, n: int) -> ModelCalls:
    """The calls of a run on ``n`` items from the calls of two runs on ``n_small`` < ``n_large`` items, each count
    taken as affine in the items (references, evaluations, NeMo searches and attacks per item, controls fixed):
    rows, calls and images grow by their slope between the two runs. The largest call and the live UNets do not
    grow: a row budget and the batch sizes set them. Exact where every item costs the same; NeMo's search, whose
    length depends on the item, makes it an estimate."""
    if not 0 < n_small < n_large:
        raise ValueError(f"Need two runs on 0 < n_small < n_large items, got {n_small} and {n_large}")
    if n < 1:
        raise ValueError(f"Extrapolate to at least one item, not {n}")

    def grown(a: int, b: int) -> int:
        return max(0, round(a + (b - a) * (n - n_small) / (n_large - n_small)))

    calls = ModelCalls()
    for key in dict.fromkeys([*small.unet, *large.unet]):
        a, b = small.unet.get(key, CallTally()), large.unet.get(key, CallTally())
        calls.unet[key] = CallTally(grown(a.rows, b.rows), grown(a.calls, b.calls),
                                    max(a.max_rows_per_call, b.max_rows_per_call), max(a.max_live_unets, b.max_live_unets),
                                    max(a.max_live_unet_bytes, b.max_live_unet_bytes))
    for key in dict.fromkeys([*small.vae, *large.vae]):
        calls.vae[key] = grown(small.vae.get(key, 0), large.vae.get(key, 0))
    return calls


def _dtype_name(model: torch.nn.Module) -> str:
    return str(model.dtype).removeprefix("torch.")


def _bytes(dtype: str) -> int:
    return getattr(torch, dtype).itemsize


def estimate(calls: ModelCalls, gpu: str, optimizer: str = "adafactor", exclude_phases=("NeMo statistics",)) -> dict:
    """Hours and peak GB on ``gpu`` (a key of ``GPUS``) for the calls of one run, by phase, at SD v1.4's sizes.

    Time: FLOPs / (peak of the call's dtype x ``EFFICIENCY``). Peak memory: the live UNets' weights (each in its own
    dtype), the VAE and the text encoder, plus the largest call's saved activations; weight gradients add float32
    gradients and the optimizer's state (Adafactor's factored state is about 1% of the parameters; AdamW's two
    moments 2x).
    ``exclude_phases``: on SD v1.4 the chapters load NeMo's published activation statistics (50,000 LAION prompts)
    rather than compute them; a tiny pipeline cannot use those and computes its own, which SD does not pay."""
    if gpu not in GPUS:
        raise ValueError(f"No GPU {gpu!r} in the cost model; known: {sorted(GPUS)}")
    if optimizer not in ("adafactor", "adamw"):
        raise ValueError(f"optimizer must be 'adafactor' or 'adamw', not {optimizer!r}")
    spec = GPUS[gpu]
    peak_gb, by_phase = 0.0, defaultdict(float)

    def add_time(phase: str, dtype: str, tflop: float) -> None:
        rate = spec["tflops"].get(dtype) or spec["tflops"]["float32"]  # no bf16 units (T4): float32 speed
        by_phase[phase] += tflop / (rate * EFFICIENCY) / 3600

    for (phase, mode, dtype, checkpointing), tally in calls.unet.items():
        if phase in exclude_phases:
            continue
        tflop = UNET_TFLOP[mode] + (UNET_TFLOP["forward"] if checkpointing and mode != "forward" else 0.0)
        add_time(phase, dtype, tally.rows * tflop)
        weights = (tally.max_live_unet_bytes * PARAMETERS["unet"]
                   + (PARAMETERS["vae"] + PARAMETERS["text_encoder"]) * 2) / 1e9
        if mode == "weight-grad":
            state = {"adafactor": 0.01, "adamw": 2.0}[optimizer]
            weights += PARAMETERS["unet"] * 4 * (1 + state) / 1e9
        activations = tally.max_rows_per_call * ACTIVATION_GB[(mode, checkpointing)] * _bytes(dtype) / 4
        peak_gb = max(peak_gb, weights + activations)
    for (phase, kind, dtype), images in calls.vae.items():
        if phase not in exclude_phases:
            add_time(phase, dtype, images * VAE_TFLOP[kind])
    return {"gpu": gpu, "hours": sum(by_phase.values()), "peak_gb": peak_gb, "fits": peak_gb <= spec["memory_gb"],
            "hours_by_phase": dict(by_phase)}


def cost_model() -> dict:
    """The constants every estimate rests on, recorded beside the estimates."""
    return {"unet_tflop_per_row": UNET_TFLOP, "vae_tflop_per_image": VAE_TFLOP, "parameters": PARAMETERS,
            "activation_gb_per_row_float32": {f"{mode}{', checkpointing' if ckpt else ''}": gb
                                              for (mode, ckpt), gb in ACTIVATION_GB.items()},
            "gpus": GPUS, "efficiency": EFFICIENCY}


TABLE_START, TABLE_END = "<!-- chapter-costs:start -->", "<!-- chapter-costs:end -->"


def cost_table(record: dict) -> str:
    """A markdown table of the estimates in ``record`` (benchmarks/results/chapter-costs.json): one row per chapter,
    hours and peak GB per profile and GPU, and a line on what the numbers are."""
    profiles = record["profiles"]
    columns = [(profile, gpu) for profile in profiles for gpu in GPUS]
    chapters = list(dict.fromkeys(c for chapters in profiles.values() for c in chapters))
    lines = ["| chapter | " + " | ".join(f"`{p}` on {'an' if g[0] in 'AEIOU' else 'a'} {g}" for p, g in columns)
             + " |",
             "|---|" + "---|" * len(columns)]
    for chapter in chapters:
        cells = []
        for profile, gpu in columns:
            counted = profiles[profile].get(chapter, {})
            entry = counted.get("estimates", {}).get(gpu)
            cells.append("-" if entry is None else
                         f"{entry['hours']:.1f} h, {entry['peak_gb']:.0f} GB{'' if entry['fits'] else ' (does not fit)'}"
                         + ("\\*" if "extrapolated_from_items" in counted else ""))
        lines.append(f"| {chapter} | " + " | ".join(cells) + " |")
    totals = []
    for profile, gpu in columns:
        hours = sum(profiles[profile][c]["estimates"][gpu]["hours"] for c in profiles[profile])
        missing = [c.split("_")[0] for c in chapters if c not in profiles[profile]]
        totals.append(f"{hours:.1f} h" + (f" without {', '.join(missing)} (not counted)" if missing else ""))
    lines.append("| all | " + " | ".join(totals) + " |")
    lines.append("")
    lines.append(f"Estimates, not measurements (counted {record.get('updated', '?')} by "
                 "`benchmarks/chapter_costs.py`): each chapter's UNet and VAE calls, counted on a tiny pipeline at the "
                 "profile's sizes, times SD v1.4's FLOPs per row, at "
                 f"{EFFICIENCY:.0%} of the GPU's dense peak (one public A100 sampling benchmark's share); peak "
                 "memory from the weights held and the largest call's saved activations. Hours exclude downloads "
                 "and NeMo's published statistics, and count reference images once, in the first chapter (the "
                 "others read them from the cache).")
    scaled = {(tuple(c["extrapolated_from_items"]), c["items"]) for chapters in profiles.values()
              for c in chapters.values() if "extrapolated_from_items" in c}
    for (n_small, n_large), n in sorted(scaled):
        lines.append(f"\n\\* Counted at {n_small} and {n_large} items and extrapolated to {n} "
                     "(`costs.extrapolate_calls`: each count affine in the items).")
    return "\n".join(lines)


def replace_cost_table(text: str, table: str) -> str:
    """``text`` with the part between the chapter-costs markers replaced by ``table``."""
    if TABLE_START not in text or TABLE_END not in text:
        raise ValueError(f"No {TABLE_START} ... {TABLE_END} markers in the page: add them where the table goes.")
    head, rest = text.split(TABLE_START, 1)
    return f"{head}{TABLE_START}\n{table}\n{TABLE_END}{rest.split(TABLE_END, 1)[1]}"


def run_time_note(chapter: str, root: Path | None = None) -> str:
    """A chapter's cost in one line for its opening: its time in the book's last full run on the organism
    (``results/timings-organism.json``) and its estimated time on a Colab T4 (``colab`` profile,
    ``benchmarks/results/chapter-costs.json``); each part says so when it was never measured."""
    import json

    root = Path(root) if root is not None else Path(__file__).resolve().parents[2]
    timings = root / "results" / "timings-organism.json"
    timed = json.loads(timings.read_text()) if timings.exists() else {}
    run = next((r for r in timed.get("chapters", []) if Path(r["chapter"]).stem == chapter and r.get("status") == "ok"),
               None)
    cores = timed.get("machine", {}).get("cpu_count", "?")
    organism = (f"{run['seconds'] / 60:.1f} minutes on the organism ({cores} CPU cores, the book's run of "
                f"{run['finished'][:10]})" if run else "not yet timed on the organism")
    record_path = root / "benchmarks" / "results" / "chapter-costs.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    estimate = record.get("profiles", {}).get("colab", {}).get(chapter, {}).get("estimates", {}).get("T4")
    duration = (f"{estimate['hours']:.1f} h" if estimate and estimate["hours"] >= 0.1
                else f"{estimate['hours'] * 60:.0f} minutes" if estimate else "")
    gpu = (f"about {duration} and {estimate['peak_gb']:.0f} GB on a Colab T4 with Stable Diffusion "
           f"(`colab` profile; estimated{'' if estimate['fits'] else ', does not fit'})" if estimate
           else "not yet estimated on a GPU")
    return f"*Run time: {organism}; {gpu}.*"
