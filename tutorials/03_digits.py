# %% [markdown]
# # Handwritten digits (64-d): fewer samples between the classes
#
# The double moon showed a flow's "bridges" in 2-D. Real data has them too: a flow trained on
# images of digits must stretch space between the classes, and naive samples x = f(z), z ~ N(0, I),
# that land there look like no digit at all. Here we train a zuko flow on scikit-learn's 8x8
# handwritten digits (1,797 images, 64 dimensions; shipped with scikit-learn, no download), then
# compare naive sampling with latent MALA on the tempered target (T2)
#
#     log pi_beta(z) = log q_Z(z) - beta * log|det J_f(z)|,
#
# for a few values of beta and both preconditioners. There is no true density to score against,
# so we measure what a user looks at:
#
# - **between classes**: the share of samples that a classifier trained on the real digits
#   (logistic regression) labels with low confidence;
# - **nearest-neighbour precision and recall** against held-out real digits (Kynkäänniemi et al.,
#   2019): precision, the share of samples on the real digits' manifold; recall, the share of real
#   digits on the samples' manifold (it falls if sampling drops some styles or classes);
# - **class balance**: the share of each predicted class (the real digits are about 10% each).
#
# Run: `python tutorials/03_digits.py` (about 5 minutes on 2 cores); `SMOKE_TEST=1` for seconds.

# %%
import os
import time

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from sklearn.datasets import load_digits  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

from pyro_nfmala import (  # noqa: E402
    ChainSampler,
    default_flow,
    fit_flow_to_samples,
    knn_precision_recall,
    load_flow,
    save_flow,
    tempered_target,
)

SMOKE = os.environ.get("SMOKE_TEST") == "1"
HERE = Path(__file__).resolve().parent
FIGURES = HERE / "figures"
OUTPUTS = HERE / "outputs"
FIGURES.mkdir(exist_ok=True)
OUTPUTS.mkdir(exist_ok=True)
SUFFIX = "_smoke" if SMOKE else ""
torch.set_num_threads(2)
torch.manual_seed(0)

COPIES = 2 if SMOKE else 10  # dequantized copies of each training image
FIT_STEPS = 30 if SMOKE else 3_000
NUM_SAMPLES = 300 if SMOKE else 1_500
WARMUP, STEPS = (3, 3) if SMOKE else (100, 100)
# An affine coupling flow (RealNVP): in 64 dimensions zuko's spline flow costs about 10x more per
# pass on CPU, for little gain here. Smoke mode shrinks it.
FLOW_OPTIONS = dict(transforms=2, hidden_features=(32, 32)) if SMOKE else {}
BETAS = (0.1, 0.5, 1.0)
LOW_CONFIDENCE = 0.5  # a sample is "between classes" when no class gets at least this probability

# %% [markdown]
# ## 1. The data: dequantize, then logit
# Pixels are integers 0..16. We add uniform noise and rescale to (0, 1), v = (pixel + u) / 17,
# then map to the real line, y = logit(a + (1 - 2a) v) with a = 0.05, so that a flow with a
# Gaussian base fits a continuous density. Samples go back to pixels by the inverse map.
# 600 images are held out (the flow and the classifier never see them): 300 are the real set that
# samples are compared with, 300 more are scored like samples (the best a sampler can do).

# %%
ALPHA = 0.05


def to_logit(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    v = (pixels + torch.rand(pixels.shape, generator=generator)) / 17
    p = ALPHA + (1 - 2 * ALPHA) * v
    return p.log() - (-p).log1p()


def to_pixels(y: torch.Tensor) -> torch.Tensor:
    """The inverse map, back to integer pixels: floor(17 v) undoes the dequantization."""
    v = (torch.sigmoid(y) - ALPHA) / (1 - 2 * ALPHA)
    return (17 * v).floor().clamp(0, 16)


digits = load_digits()
images, labels = digits.data.astype(np.float32), digits.target
train_images, held_out, train_labels, held_out_labels = train_test_split(images, labels, test_size=600, stratify=labels, random_state=0)
# two held-out sets of 300: "real" is what samples are compared with; "fresh" are real digits
# scored like samples, the best any sampler can do
real_images, fresh_images, real_labels, fresh_labels = train_test_split(
    held_out, held_out_labels, test_size=300, stratify=held_out_labels, random_state=0
)
generator = torch.Generator().manual_seed(0)
train_pixels = torch.as_tensor(train_images)
train_y = torch.cat([to_logit(train_pixels, generator) for _ in range(COPIES)])
print(f"{len(train_images)} training images x {COPIES} dequantized copies = {len(train_y)} points in {train_y.shape[1]} dimensions")

# %% [markdown]
# ## 2. Train a flow (maximum likelihood), and a classifier on the real digits

# %%
start = time.perf_counter()
fit = fit_flow_to_samples(train_y, default_flow(64, kind="affine", **FLOW_OPTIONS), num_steps=FIT_STEPS, batch_size=256, progress=not SMOKE)
fit_seconds = time.perf_counter() - start
print(f"flow trained in {fit_seconds:.0f} s, final NLL {np.mean(fit.losses[-100:]):.2f} nats per image (logit space)")
path = OUTPUTS / f"03_digits_flow{SUFFIX}.pt"
save_flow(fit.flow, path, losses=fit.losses)
flow = load_flow(path)

classifier = LogisticRegression(max_iter=5_000).fit(train_images / 16, train_labels)
print(f"classifier accuracy on held-out real digits: {classifier.score(held_out / 16, held_out_labels):.3f}")

# %% [markdown]
# ## 3. Sample: naive, and latent MALA on T2 (N chains from z ~ q_Z, warmup, K steps, map back)

# %%
samples, timings = {}, {}
start = time.perf_counter()
with torch.no_grad():
    samples["naive, x = f(z)"] = to_pixels(flow().sample((NUM_SAMPLES,)))
timings["naive, x = f(z)"] = time.perf_counter() - start
configs = [(beta, precond) for beta in BETAS for precond in ("identity", "jacobian")]
step_sizes = {}
for beta, precond in configs:
    label = f"T2 beta={beta}, {precond}"
    start = time.perf_counter()
    sampler = ChainSampler(tempered_target(flow, beta), NUM_SAMPLES, preconditioner=precond, seed=1)
    sampler.warmup(WARMUP, progress=not SMOKE)
    step_sizes[label] = float(sampler.step_size.mean())
    samples[label] = to_pixels(sampler.advance(STEPS, progress=not SMOKE).x)
    timings[label] = time.perf_counter() - start

# %% [markdown]
# ## 4. Measure: between classes, precision and recall, class balance
# Precision and recall compare 300 samples with 300 held-out digits (k = 3, pixels scaled to
# [0, 1]), averaged over disjoint sets of 300 samples; the first row scores 300 other held-out
# digits the same way.

# %%
real = torch.as_tensor(real_images)


def evaluate(pixels: torch.Tensor) -> dict:
    pixels = pixels.detach().cpu()
    finite = torch.isfinite(pixels).all(-1)
    probs = classifier.predict_proba(pixels[finite].numpy() / 16)
    confidence, predicted = probs.max(-1), probs.argmax(-1)
    balance = np.bincount(predicted, minlength=10) / len(predicted)
    sets = [pixels[i : i + len(real)] for i in range(0, len(pixels) - len(real) + 1, len(real))] or [pixels]
    pr = np.mean([knn_precision_recall(real / 16, s / 16, k=3) for s in sets], axis=0)
    return {
        "low_confidence": float((confidence < LOW_CONFIDENCE).mean()),
        "mean_confidence": float(confidence.mean()),
        "precision": float(pr[0]),
        "recall": float(pr[1]),
        "balance": balance,
        "balance_error": float(np.abs(balance - 0.1).max()),
        "confidence": confidence,
        "non_finite": int((~finite).sum()),
        "saturated": float(((pixels == 0) | (pixels == 16)).double().mean()),
    }


metrics = {"held-out real digits": evaluate(torch.as_tensor(fresh_images))}
metrics.update({label: evaluate(x) for label, x in samples.items()})
timings["held-out real digits"] = float("nan")
print(f"{NUM_SAMPLES} samples each; {STEPS} MALA steps after {WARMUP} warmup steps; flow training {fit_seconds:.0f} s")
print(
    f"| method | between classes (conf. < {LOW_CONFIDENCE}) | mean confidence | precision | recall | worst class share - 10% "
    "| saturated pixels | step size | time (s) |"
)
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for label, m in metrics.items():
    step = f"{step_sizes[label]:.2g}" if label in step_sizes else ""
    print(
        f"| {label} | {m['low_confidence']:.3f} | {m['mean_confidence']:.3f} | {m['precision']:.3f} | {m['recall']:.3f} "
        f"| {100 * m['balance_error']:.1f} pts | {m['saturated']:.3f} | {step} | {timings[label]:.1f} |"
    )
naive = metrics["naive, x = f(z)"]
for beta, precond in configs:
    m = metrics[f"T2 beta={beta}, {precond}"]
    print(
        f"T2 beta={beta}, {precond}: between-class share {m['low_confidence']:.3f} against naive {naive['low_confidence']:.3f} "
        f"({naive['low_confidence'] / max(m['low_confidence'], 1 / NUM_SAMPLES):.1f}x lower); precision "
        f"{m['precision']:.3f} (naive {naive['precision']:.3f}), recall {m['recall']:.3f} (naive {naive['recall']:.3f})"
    )
    if m["non_finite"]:
        print(f"  {m['non_finite']} non-finite samples (not expected: please report)")

# %% [markdown]
# ## 5. Figures: the samples side by side, and the samples between classes

# %%


def image_grid(ax, pixels: torch.Tensor, rows: int = 8, cols: int = 8) -> None:
    pixels = pixels[: rows * cols].reshape(-1, 8, 8)
    canvas = torch.full((rows * 9 - 1, cols * 9 - 1), float("nan"))  # NaN: the light separators
    for i, image in enumerate(pixels):
        r, c = divmod(i, cols)
        canvas[r * 9 : r * 9 + 8, c * 9 : c * 9 + 8] = image
    cmap = plt.get_cmap("gray_r").with_extremes(bad="#f4c430")
    ax.imshow(canvas, cmap=cmap, vmin=0, vmax=16, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


panels = {"held-out real digits": torch.as_tensor(fresh_images), **samples}
fig, axes = plt.subplots(2, 4, figsize=(17, 9.6))
for ax, (label, pixels) in zip(axes.flat, panels.items()):
    image_grid(ax, pixels)
    m = metrics[label]
    ax.set_title(f"{label}\nbetween classes {m['low_confidence']:.1%}, precision {m['precision']:.2f}, recall {m['recall']:.2f}", fontsize=10)
fig.suptitle("8x8 digits: the first 64 samples of each method (no selection)")
fig.tight_layout()
fig.savefig(FIGURES / f"03_samples{SUFFIX}.png", dpi=100)

# The least confident samples of naive sampling and of the best MALA run, with the classifier's top guess
best = min((label for label in samples if label.startswith("T2")), key=lambda label: metrics[label]["low_confidence"])
fig, axes = plt.subplots(2, 12, figsize=(14, 3.4))
for row, label in zip(axes, ["naive, x = f(z)", best]):
    pixels = samples[label]
    confidence = metrics[label]["confidence"]
    order = np.argsort(confidence)[: len(row)]
    probs = classifier.predict_proba(pixels[order].numpy() / 16)
    for ax, index, p in zip(row, order, probs):
        ax.imshow(pixels[index].reshape(8, 8), cmap="gray_r", vmin=0, vmax=16, interpolation="nearest")
        top = np.argsort(p)[::-1][:2]
        ax.set_title(f"{top[0]}:{p[top[0]]:.2f}\n{top[1]}:{p[top[1]]:.2f}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    row[0].set_ylabel(label.replace(", ", ",\n"), fontsize=8)
fig.suptitle("The 12 least confident samples of each (classifier's top two classes and probabilities)", fontsize=10)
fig.tight_layout()
fig.savefig(FIGURES / f"03_between_classes{SUFFIX}.png", dpi=100)

# %% [markdown]
# ## 6. Figures: what the numbers say

# %%
fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
labels_ = list(metrics)
colors = plt.cm.tab10(np.arange(len(labels_)))
axes[0].barh(labels_, [metrics[label]["low_confidence"] for label in labels_], color=colors)
axes[0].set(xlabel=f"share of samples with classifier confidence < {LOW_CONFIDENCE}", title="Between classes (lower is better)")
axes[0].invert_yaxis()
width = 0.8 / len(labels_)
for i, label in enumerate(labels_):
    axes[1].bar(np.arange(10) + (i - len(labels_) / 2) * width, metrics[label]["balance"], width, color=colors[i], label=label)
axes[1].axhline(0.1, color="grey", lw=0.8, ls=":")
axes[1].set(xlabel="predicted class", ylabel="share of samples", title="Class balance", xticks=range(10))
axes[1].legend(fontsize=7)
for i, label in enumerate(labels_):
    axes[2].scatter(metrics[label]["recall"], metrics[label]["precision"], color=colors[i], s=50, label=label)
axes[2].set(xlabel="recall (real digits covered)", ylabel="precision (samples on the real digits)", title="Nearest-neighbour precision and recall")
axes[2].legend(fontsize=7)
fig.tight_layout()
fig.savefig(FIGURES / f"03_metrics{SUFFIX}.png", dpi=100)

fig, ax = plt.subplots(figsize=(5, 3))
ax.plot(fit.losses, lw=0.5)
ax.set(xlabel="Adam step", ylabel="minibatch NLL", title="Training the flow on the digits (logit space)")
fig.tight_layout()
fig.savefig(FIGURES / f"03_fit_loss{SUFFIX}.png", dpi=100)
print(f"figures written to {FIGURES}")

# %% [markdown]
# ## 7. What we measured, and why the goal is not met here
#
# Measured on 2026-11-29 (2 cores; 1,500 samples each; 100 MALA steps after 100 warmup steps;
# RealNVP trained 3,000 steps in 57 s; classifier accuracy 0.970 on held-out digits):
#
# | method | between classes (conf. < 0.5) | precision | recall | worst class share - 10% | saturated pixels | step size |
# | --- | --- | --- | --- | --- | --- | --- |
# | held-out real digits | 0.027 | 0.897 | 0.917 | 1.0 pts | 0.583 | |
# | naive, x = f(z) | 0.175 | 0.893 | 0.775 | 3.5 pts | 0.439 | |
# | T2 beta=0.1, identity | 0.191 | 0.800 | 0.798 | 8.6 pts | 0.539 | 0.31 |
# | T2 beta=0.1, jacobian | 0.178 | 0.899 | 0.759 | 2.7 pts | 0.440 | 3.9e-06 |
# | T2 beta=0.5, identity | 0.497 | 0.167 | 0.597 | 12.5 pts | 0.670 | 0.013 |
# | T2 beta=0.5, jacobian | 0.171 | 0.899 | 0.762 | 2.9 pts | 0.440 | 3.9e-06 |
# | T2 beta=1.0, identity | 0.519 | 0.085 | 0.533 | 9.2 pts | 0.643 | 0.0048 |
# | T2 beta=1.0, jacobian | 0.174 | 0.899 | 0.765 | 2.9 pts | 0.440 | 4e-06 |
#
# **The goal (clearly fewer between-class samples than naive sampling, class balance within a
# few points) is not met on this data with this flow.** Naive sampling puts 17.5% of its samples
# between classes (real digits: 2.7%). Two different failures explain why latent MALA does not
# lower it:
#
# - **The identity preconditioner moves, towards saturated images.** T2 weights the flow's own
#   density by |det J_f|^(-beta): it favours where the flow contracts, and this flow contracts
#   most at the faces of the data's box (a dequantized pixel maps to at most
#   [logit(0.05), logit(0.95)] = [-2.94, 2.94]), not in the gaps between classes. The share of
#   saturated pixels (0 or 16) rises from 0.44 (naive) to 0.67 at beta = 0.5, past the real
#   digits' 0.58, and the images turn into blocky black-and-white shapes (figure
#   `03_samples.png`): between classes 50%, precision 0.17. Even beta = 0.1 does not help (19%).
#   An experiment outside this script, with Gaussian instead of uniform dequantization (noise sd
#   0.5 pixel levels) and standardized pixels instead of the logit, so with no box faces, gave
#   the same picture: naive 16% between classes, T2 identity 34% (beta = 0.5) and 40% (beta = 1).
# - **The jacobian preconditioner does not move.** Its proposal maps a data-space Langevin step
#   to latent space with J_f at the current point, and the reverse move is scored with J_f at the
#   proposal. Our reading (not yet measured): on this trained 64-d flow J_f changes fast over a
#   step, the two disagree unless the step is tiny, and dual averaging shrinks the step size to 4e-6 (1e-6 in the Gaussian
#   experiment): the chains stay where the flow put them, and every number equals naive
#   sampling's up to noise.
#
# What we have not tried: flows with smoother Jacobians (fewer, smaller coupling layers; spline
# flows with more bins), longer runs of the identity sampler at beta well below 0.1, and T2 with
# a temperature on the base density as well. The 2-D double moon (tutorial 01) is the setting
# where T2 with the jacobian preconditioner does empty the gaps (9x less gap mass).
