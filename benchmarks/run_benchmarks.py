"""Benchmarks (not tests): wall time of each chapter, and of one Dori attack step on an SD-shaped UNet.

    python benchmarks/run_benchmarks.py                      # every chapter, organism profile, one at a time
    python benchmarks/run_benchmarks.py --chapters 02 03     # some chapters
    python benchmarks/run_benchmarks.py --sd-unet            # GPU only: SD v1.4-shaped UNet attack step
    python benchmarks/run_benchmarks.py --sd-unet --no-chapters

Results go to benchmarks/results/<machine>.json (machine: --machine, default derived from the GPU or CPU count),
with a description of the machine. Chapters are executed by the same executor as `dori-book run` into a
temporary folder, so the book's notebooks are left untouched.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

from dori_utils.book import cli
from dori_utils.book.costs import SD_V1_4_UNET

HERE = Path(__file__).resolve().parent


def default_machine_name(info: dict) -> str:
    name = info.get("gpu") or f"cpu-{info['cpu_count']}cores"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def time_chapters(root: Path, patterns: list[str] | None, profile: str = "organism") -> list[dict]:
    """Wall time of each chapter, one at a time, with the profile's parameters (default: the organism)."""
    parameters = cli.load_profile(profile, root)
    chapters = cli.select_chapters(cli.toc_chapters(root), root, patterns)
    rows = []
    with tempfile.TemporaryDirectory(prefix="dori-bench-") as scratch:
        for chapter in chapters:
            if not chapter.exists():
                print(f"  {chapter.relative_to(root)}: not written yet, skipped")
                continue
            output = Path(scratch) / chapter.relative_to(root)
            try:
                seconds = cli.execute_chapter(chapter, output, parameters, progress=False)
                row = {"chapter": chapter.relative_to(root).as_posix(), "seconds": round(seconds, 1), "status": "ok"}
            except cli.ChapterFailed as error:
                print(error, file=sys.stderr)
                row = {"chapter": chapter.relative_to(root).as_posix(), "seconds": None, "status": "failed"}
            print(f"  {row['chapter']:<48} " + (f"{row['seconds']:7.1f} s" if row["status"] == "ok" else "FAILED"))
            rows.append(row)
    return rows


def require_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("The SD-shaped UNet benchmark needs a CUDA GPU, and torch.cuda.is_available() is False "
                         f"(torch {torch.__version__}). Run it on a GPU machine, or leave out --sd-unet.")


def sd_unet_benchmark(batch: int = 8, tokens: int = 77, repeats: int = 3, device: str = "cuda",
                      config: dict | None = None, dtypes=("fp32", "fp16", "bf16")) -> list[dict]:
    """Time one Dori attack step on a randomly initialised UNet shaped like SD v1.4's.

    One step: an adversarial embedding (batch x 77 x 768, fp32 leaf, requires_grad) is cast to the UNet's dtype;
    the frozen UNet predicts the noise of noised 64 x 64 x 4 latents at random timesteps; MSE on the noise;
    backward to the embedding; an Adam step (lr 0.1). Reported for each dtype, with and without
    ``unet.enable_gradient_checkpointing()``: mean seconds per step and ``torch.cuda.max_memory_allocated``.
    """
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # "modules that should be kept in float32" after each .to(dtype)

    if device == "cuda":
        require_cuda()
    config = config or SD_V1_4_UNET
    types = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config).to(device).requires_grad_(False).eval()
    parameters = sum(p.numel() for p in unet.parameters())
    side, channels, width = config["sample_size"], config["in_channels"], config["cross_attention_dim"]
    alphas = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2, 0).to(device)  # SD schedule
    rows = []
    for name in dtypes:
        dtype = types[name]
        unet.to(dtype)
        for checkpointing in (False, True):
            if checkpointing:
                unet.enable_gradient_checkpointing()
            else:
                unet.disable_gradient_checkpointing()
            embedding = torch.randn(batch, tokens, width, device=device, requires_grad=True)
            optimizer = torch.optim.Adam([embedding], lr=0.1)
            latents = torch.randn(batch, channels, side, side, device=device)

            def step():
                noise = torch.randn_like(latents)
                t = torch.randint(0, 1000, (batch,), device=device)
                a = alphas[t].view(-1, 1, 1, 1)
                noisy = (a.sqrt() * latents + (1 - a).sqrt() * noise).to(dtype)
                prediction = unet(noisy, t, encoder_hidden_states=embedding.to(dtype)).sample
                loss = torch.nn.functional.mse_loss(prediction.float(), noise)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                return loss

            row = {"dtype": name, "gradient_checkpointing": checkpointing, "batch": batch,
                   "embedding": [batch, tokens, width], "unet_parameters": parameters}
            try:
                step()  # warm-up: kernels, allocator
                if device == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                started = time.perf_counter()
                for _ in range(repeats):
                    loss = step()
                if device == "cuda":
                    torch.cuda.synchronize()
                row["seconds_per_step"] = round((time.perf_counter() - started) / repeats, 4)
                row["finite_loss"] = bool(torch.isfinite(loss).item())
                if device == "cuda":
                    row["max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
            except torch.cuda.OutOfMemoryError:
                row["error"] = "out of memory"
            except RuntimeError as error:  # e.g. a dtype the device does not support
                row["error"] = str(error).splitlines()[0][:200]
            finally:
                del embedding, optimizer
                if device == "cuda":
                    torch.cuda.empty_cache()
            print(f"  {name:>4}  checkpointing={str(checkpointing):<5}  "
                  f"{row.get('seconds_per_step', '-')} s/step  {row.get('max_memory_allocated_gib', '-')} GiB  "
                  f"{row.get('error', '')}")
            rows.append(row)
    unet.disable_gradient_checkpointing()
    return rows


# Dense peak TFLOP/s per dtype (vendor data sheets, without sparsity), for the share of the FLOP floor.
PEAK_TFLOPS = {
    "H100": {"fp32": 67.0, "fp16": 989.0, "bf16": 989.0},
    "H200": {"fp32": 67.0, "fp16": 989.0, "bf16": 989.0},
    "A100": {"fp32": 19.5, "fp16": 312.0, "bf16": 312.0},
    "L4": {"fp32": 30.3, "fp16": 121.0, "bf16": 121.0},
    "T4": {"fp32": 8.1, "fp16": 65.0, "bf16": None},
}


def step_flops(unet, batch: int, tokens: int, dtype, device) -> int:
    """FLOPs of one forward and backward of the attack step, counted by torch's FlopCounterMode."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    config = unet.config
    latents = torch.randn(batch, config.in_channels, config.sample_size, config.sample_size, device=device, dtype=dtype)
    embedding = torch.randn(batch, tokens, config.cross_attention_dim, device=device, dtype=dtype, requires_grad=True)
    t = torch.randint(0, 1000, (batch,), device=device)
    with FlopCounterMode(display=False) as counter:
        unet(latents, t, encoder_hidden_states=embedding).sample.float().pow(2).mean().backward()
    return counter.get_total_flops()


def add_flop_floor(rows: list[dict], flops: dict, gpu_name: str | None) -> None:
    """Achieved TFLOP/s and, where the GPU's peak is known, the share of the FLOP floor each setting reaches."""
    peaks = next((v for k, v in PEAK_TFLOPS.items() if gpu_name and k in gpu_name), {})
    for row in rows:
        if "seconds_per_step" not in row:
            continue
        achieved = flops[row["dtype"]] / row["seconds_per_step"] / 1e12
        row["step_tflop"] = round(flops[row["dtype"]] / 1e12, 3)
        row["achieved_tflops"] = round(achieved, 2)
        if peaks.get(row["dtype"]):
            row["share_of_peak"] = round(achieved / peaks[row["dtype"]], 3)


def organism_methods_benchmark(repeats: int = 1) -> dict:
    """Wall time of one Dori attack (one embedding, 50 steps, batch 8) and of NeMo for one prompt, on the organism."""
    import torch

    from dori_utils import attack, load_backend, nemo

    backend = load_backend("organism")
    item = backend.memorized[0]
    embedding = backend.encode_prompts([item.prompt])
    statistics, threshold, _ = nemo.find_neurons(backend, [], n_statistics=3000, n_calibration=100)
    timings = {}
    started = time.perf_counter()
    for _ in range(repeats):
        attack.dori_attack(backend, item.references[:1], embedding, steps=50)
    timings["dori_attack_50_steps_seconds"] = round((time.perf_counter() - started) / repeats, 2)
    started = time.perf_counter()
    for _ in range(repeats):
        result = nemo.localize(backend, embedding, statistics, threshold)
    timings["nemo_localisation_seconds"] = round((time.perf_counter() - started) / repeats, 2)
    timings["nemo_evaluations"] = result.evaluations
    timings["torch_threads"] = torch.get_num_threads()
    return timings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chapters", nargs="+", metavar="PATTERN", help="only these chapters (as dori-book run)")
    parser.add_argument("--no-chapters", action="store_true", help="skip the chapter timings")
    parser.add_argument("--profile", default="organism", help="profile for the chapters (default organism)")
    parser.add_argument("--sd-unet", action="store_true", help="also time a Dori step on an SD-shaped UNet (GPU)")
    parser.add_argument("--batch", type=int, default=8, help="attack batch for --sd-unet (default 8)")
    parser.add_argument("--methods", action="store_true", help="also time one Dori attack and NeMo for one prompt")
    parser.add_argument("--machine", help="name of the results file (default: from the GPU or CPU count)")
    args = parser.parse_args(argv)

    root = cli.find_root(HERE.parent)
    info = cli.machine_info()
    record = {"machine": info, "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "profile": args.profile}
    if args.sd_unet:
        require_cuda()  # before the chapters: fail fast, with the message
    if args.methods:
        print("Organism methods: one Dori attack, NeMo for one prompt")
        record["organism_methods"] = organism_methods_benchmark()
        print(f"  {record['organism_methods']}")
    if not args.no_chapters:
        print(f"Chapters, profile {args.profile!r}, on {info['cpu_count']} CPU core(s), GPU: {info['gpu']}")
        record["chapters"] = time_chapters(root, args.chapters, args.profile)
        record["total_seconds"] = round(sum(r["seconds"] or 0 for r in record["chapters"]), 1)
    if args.sd_unet:
        print(f"SD v1.4-shaped UNet, one Dori attack step, batch {args.batch}, on {info['gpu']}")
        record["sd_unet_attack_step"] = sd_unet_benchmark(batch=args.batch)
        import torch
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel(**SD_V1_4_UNET).to("cuda").requires_grad_(False)
        flops = {}
        for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
            flops[name] = step_flops(unet.to(dtype), args.batch, 77, dtype, "cuda")
        add_flop_floor(record["sd_unet_attack_step"], flops, info["gpu"])
    out = HERE / "results" / f"{args.machine or default_machine_name(info)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"Wrote {out}")
    return 1 if any(r["status"] != "ok" for r in record.get("chapters", [])) else 0


if __name__ == "__main__":
    sys.exit(main())
