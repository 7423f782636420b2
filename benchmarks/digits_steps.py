"""How the paper's procedure (N chains from naive draws, K steps on T2) depends on K, on the digits.

Loads the flow that `tutorials/03_digits.py` trained and saved (run the tutorial first), runs the
identity preconditioner on T2 at each beta of ``BETAS`` and, every few steps, scores the chains'
current states as the tutorial does: the share the classifier labels with confidence < 0.5
("between classes") and the worst class share's distance from 10%. The last row of each beta is
the importance-weighted preview of T2 itself (K -> infinity), with the ESS of its weights.

Run: `python benchmarks/digits_steps.py` (about 11 minutes on 2 cores, after the tutorial).
"""

import sys

from pathlib import Path

import numpy as np
import torch

from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from pyro_nfmala import ChainSampler, TemperedFlow, load_flow, preview_tempering

torch.set_num_threads(2)
FLOW = Path(__file__).resolve().parents[1] / "tutorials" / "outputs" / "03_digits_flow.pt"
ALPHA = 0.05  # the tutorial's logit transform
BETAS = (0.1, 1.0)
NUM_CHAINS, WARMUP, CHECKPOINTS = 1_000, 100, (0, 50, 100, 200, 400, 800)


def to_pixels(y: torch.Tensor) -> torch.Tensor:
    return (17 * (torch.sigmoid(y) - ALPHA) / (1 - 2 * ALPHA)).floor().clamp(0, 16)


def main() -> None:
    if not FLOW.exists():
        sys.exit(f"{FLOW} not found: run `python tutorials/03_digits.py` first")
    flow = load_flow(FLOW)
    digits = load_digits()
    images, _, labels, _ = train_test_split(
        digits.data, digits.target, test_size=600, stratify=digits.target, random_state=0
    )
    classifier = LogisticRegression(max_iter=5_000).fit(images / 16, labels)

    def score(pixels: torch.Tensor, weights: torch.Tensor | None = None) -> tuple[float, float]:
        probs = classifier.predict_proba(pixels.numpy() / 16)
        w = np.full(len(probs), 1 / len(probs)) if weights is None else weights.numpy()
        balance = np.bincount(probs.argmax(-1), weights=w, minlength=10)
        return float(w @ (probs.max(-1) < 0.5)), float(100 * np.abs(balance - 0.1).max())

    print(
        f"{NUM_CHAINS} chains from naive draws, identity preconditioner, "
        f"step size adapted in {WARMUP} warmup steps"
    )
    print("| beta | steps after warmup | between classes | worst class share - 10% |")
    print("| --- | --- | --- | --- |")
    preview = preview_tempering(flow, BETAS, num_samples=20_000, generator=torch.Generator().manual_seed(2))
    for row, beta in enumerate(BETAS):
        sampler = ChainSampler(TemperedFlow(flow, beta), NUM_CHAINS, preconditioner="identity", seed=1)
        sampler.warmup(WARMUP, progress=False)
        done = 0
        for k in CHECKPOINTS:
            state = sampler.advance(k - done, progress=False) if k > done else sampler.state
            done = k
            low, balance = score(to_pixels(state.x))
            print(f"| {beta} | {k} | {low:.3f} | {balance:.1f} pts |", flush=True)
        low, balance = score(to_pixels(preview.x), preview.weights[row])
        print(
            (
                f"| {beta} | T2 itself (preview, ESS {float(preview.ess[row]):.0f}) "
                f"| {low:.3f} | {balance:.1f} pts |"
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
