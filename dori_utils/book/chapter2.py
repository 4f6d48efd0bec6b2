"""Chapter 2, triggers spread over embedding space: the claim checks (the experiment is ``shared``'s)."""
from __future__ import annotations


def spread_checks(spread: dict) -> dict[str, bool]:
    """Chapter 2 (``analysis.spread_summary``): triggers of one image lie further apart than two unrelated
    prompts (the paper: larger), and each stays nearer its own start than the memorized prompt."""
    medians = spread["median_distances"]
    return {f"triggers of one image lie further apart than two unrelated prompts (median ratio "
            f"{spread['ratio_to_unrelated']:.2f}; the paper: larger than 1)": spread["ratio_to_unrelated"] > 1,
            f"triggers stay nearer their start than the memorized prompt (median distances "
            f"{medians['trigger to its start']:.1f} and {medians['trigger to its memorized prompt']:.1f})":
                medians["trigger to its start"] < medians["trigger to its memorized prompt"]}
