# %% [markdown]
# # The double moon: sampling a trained flow without the bridges
#
# A normalizing flow is continuous, so a flow fitted to two separated moons must stretch space
# between them: naive samples x = f(z), z ~ N(0, I), land on "bridges" across the empty gaps.
# Following Coeurdoux, Dobigeon & Chainais (2024), we run MALA in the flow's latent space on the
# tempered target (T2)
#
#     log pi_beta(z) = log q_Z(z) - beta * log|det J_f(z)|,
#
# which is small exactly where the flow stretches, and map the chains back through f. We compare
# naive sampling with latent MALA for beta in {0.5, 1} and both preconditioners, against exact
# samples of the true double moon, and we also run the exact target (T1, which needs the true
# density) as a reference.
#
# Run: `python tutorials/01_double_moon.py` (about 5 minutes on 2 cores); `SMOKE_TEST=1` for seconds.

# %%
import os
import time

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from pyro_nfmala import (  # noqa: E402
    ChainSampler,
    LatentFlow,
    PosteriorPullback,
    TemperedFlow,
    default_flow,
    fit_flow_to_samples,
    load_flow,
    preview_tempering,
    save_flow,
)
from pyro_nfmala.examples.metrics import gap_threshold, sample_metrics  # noqa: E402
from pyro_nfmala.examples.toys import DoubleMoon  # noqa: E402

SMOKE = os.environ.get("SMOKE_TEST") == "1"
HERE = Path(__file__).resolve().parent
FIGURES = HERE / "figures"
OUTPUTS = HERE / "outputs"
FIGURES.mkdir(exist_ok=True)
OUTPUTS.mkdir(exist_ok=True)
SUFFIX = "_smoke" if SMOKE else ""
torch.set_num_threads(2)
torch.manual_seed(0)

NUM_TRAIN = 2_000 if SMOKE else 20_000
FIT_STEPS = 50 if SMOKE else 1_500
NUM_CHAINS = 256 if SMOKE else 4_096
WARMUP, STEPS = (10, 10) if SMOKE else (100, 100)
PREVIEW_SAMPLES = 2_000 if SMOKE else 400_000  # naive draws weighted into T2's own law

# %% [markdown]
# ## 1. Train a flow on samples of the double moon (maximum likelihood)
# The default flow (`default_flow(2)`: a coupling spline flow, one pass in both directions) fits
# the moons well but, being continuous, keeps thin bridges between them.

# %%
moon = DoubleMoon()
train = moon.sample(NUM_TRAIN)
start = time.perf_counter()
fit = fit_flow_to_samples(train, default_flow(2), num_steps=FIT_STEPS, progress=not SMOKE)
print(
    f"flow trained in {time.perf_counter() - start:.1f} s, "
    f"final NLL {sum(fit.losses[-50:]) / len(fit.losses[-50:]):.3f}"
)

path = OUTPUTS / f"01_double_moon_flow{SUFFIX}.pt"
save_flow(fit.flow, path, losses=fit.losses)
flow = load_flow(path)  # the same flow, read back from disk

# %% [markdown]
# ## 2. Sample: naive, and latent MALA (the paper's way: N chains from z ~ q_Z, K steps, map back)

# %%
reference = moon.sample(20_000)  # exact draws, for the energy distance
threshold = gap_threshold(moon, level=0.001)  # exact samples put 0.1% of their mass below it
samples, timings = {}, {}

with torch.no_grad():
    start = time.perf_counter()
    samples["naive, x = f(z)"] = flow().sample((NUM_CHAINS,))
    timings["naive, x = f(z)"] = time.perf_counter() - start
samples["exact (rejection sampler)"] = moon.sample(NUM_CHAINS)
timings["exact (rejection sampler)"] = float("nan")


def last_states(target, preconditioner):
    """The paper's procedure: NUM_CHAINS chains from naive draws, WARMUP adaptive then STEPS fixed steps."""
    sampler = ChainSampler(target, NUM_CHAINS, preconditioner=preconditioner, seed=1)
    sampler.warmup(WARMUP, progress=False)
    return sampler.advance(STEPS, progress=False).x


PRECONDITIONERS = ("identity", "jacobian", "data_space")
configs = [(beta, precond) for beta in (0.5, 1.0) for precond in PRECONDITIONERS]
for beta, precond in configs:
    label = f"T2 beta={beta}, {precond}"
    start = time.perf_counter()
    samples[label] = last_states(TemperedFlow(flow, beta), precond)
    timings[label] = time.perf_counter() - start

label = "T1 (true density), jacobian"
start = time.perf_counter()
samples[label] = last_states(PosteriorPullback(flow, moon.log_prob, dim=2), "jacobian")
timings[label] = time.perf_counter() - start

# %% [markdown]
# ## 3. What improves and what gets worse
# Gap mass: the share of samples where the true density is below the level that holds 0.1% of
# the exact mass (exact sampling: 0.001). Energy distance to exact draws (exact: the noise floor).
# Mode-weight error: |share in a moon - 0.5|.

# %%
metrics = {label: sample_metrics(x, moon, reference, threshold) for label, x in samples.items()}
print(f"{NUM_CHAINS} samples each; {STEPS} MALA steps after {WARMUP} warmup steps")
print("| method | gap mass | energy distance | mode-weight error | time (s) |")
print("| --- | --- | --- | --- | --- |")
for label, m in metrics.items():
    print(
        f"| {label} | {m['gap_mass']:.4f} | {m['energy_distance']:.4f} "
        f"| {m['max_mode_weight_error']:.3f} | {timings[label]:.1f} |"
    )

# What an exact sampler of T2 converges to: naive draws weighted by |det J_f(z)|^(-beta)
# (`preview_tempering`), resampled to the same size as the chains' samples.
preview = preview_tempering(
    flow, (0.5, 1.0), num_samples=PREVIEW_SAMPLES, generator=torch.Generator().manual_seed(2)
)
for row, beta in enumerate((0.5, 1.0)):
    picks = torch.multinomial(preview.weights[row], NUM_CHAINS, replacement=True)
    m = sample_metrics(preview.x[picks], moon, reference, threshold)
    weighted_gap = float((preview.weights[row] * (moon.log_prob(preview.x) < threshold)).sum())
    print(
        f"T2 beta={beta} itself (preview of {PREVIEW_SAMPLES} weighted naive draws, ESS "
        f"{float(preview.ess[row]):.0f}): gap mass {weighted_gap:.4f}, energy distance of "
        f"{NUM_CHAINS} resampled draws {m['energy_distance']:.4f}"
    )

naive = metrics["naive, x = f(z)"]
for beta, precond in configs:
    m = metrics[f"T2 beta={beta}, {precond}"]
    gap_ratio = naive["gap_mass"] / max(m["gap_mass"], 1.0 / NUM_CHAINS)
    print(
        f"T2 beta={beta}, {precond}: gap mass {gap_ratio:.1f}x lower than naive"
        f"{' (at least: no sample in the gaps)' if m['gap_mass'] == 0 else ''}; energy distance "
        f"{m['energy_distance'] / naive['energy_distance']:.1f}x naive's; mode-weight error "
        f"{m['max_mode_weight_error']:.3f} (naive {naive['max_mode_weight_error']:.3f})"
    )

# %% [markdown]
# Measured on 2026-11-30 (2 cores; 4,096 samples each, 100 steps after 100 warmup steps; the
# jacobian and data-space moves with their default diagonal data-space mass matrix, which needs
# 150 warmup steps to adapt, so here it is the identity; times in the printed table):
#
# | method | gap mass | energy distance | mode-weight error |
# | --- | --- | --- | --- |
# | naive, x = f(z) | 0.0103 | 0.0004 | 0.016 |
# | exact (rejection sampler) | 0.0007 | 0.0005 | 0.004 |
# | T2 beta=0.5, identity | 0.0076 | 0.0055 | 0.009 |
# | T2 beta=0.5, jacobian | 0.0024 | 0.0080 | 0.016 |
# | T2 beta=0.5, data_space | 0.0020 | 0.0055 | 0.012 |
# | T2 beta=1.0, identity | 0.0081 | 0.0205 | 0.005 |
# | T2 beta=1.0, jacobian | 0.0010 | 0.0184 | 0.009 |
# | T2 beta=1.0, data_space | 0.0022 | 0.0289 | 0.014 |
# | T1 (true density), jacobian | 0.0017 | 0.0010 | 0.009 |
# | T2 beta=0.5 itself (preview) | 0.0015 | 0.0084 | |
# | T2 beta=1.0 itself (preview) | 0.0010 | 0.0206 | |
#
# **What improves**: with a data-space move (jacobian or data_space), T2 empties the gaps: at
# beta = 1 both reach the gap mass of T2 itself (0.0010, from 400,000 weighted naive draws) within
# the noise of 4,096 samples (one binomial standard error is about 0.0006 at this level), 5-10x
# less than naive sampling (0.0103; exact sampling 0.0007). **What gets worse**: T2 is not the
# flow's law, it reweights by |det J_f|^(-beta), so the moons change shape: T2's own energy
# distance to exact draws is about 0.008 at beta = 0.5 and 0.02 at beta = 1 (one resampling of
# 4,096 draws; another gave 0.006 and 0.024), against 0.0004 for naive sampling: a chain that
# converges to T2 shows that distance, and the run-to-run noise at 4,096 samples is a few
# thousandths. The mode balance stays within the noise. **Exact or linearized**: on this 2-D
# flow, J_f changes little over a step, so the exact data-space move and its linearization (the
# jacobian step) do equally well, and both land near T2's own numbers; tutorial 03 shows where
# they part (a 64-d flow). **What does not work**: the identity preconditioner barely empties the
# gaps in 100 steps: a chain that starts in a stretched band has a huge gradient there and its
# proposals overshoot and are rejected (about 200 of the 4,096 chains accept nothing, and the
# sampler says so); the data-space moves take small latent steps exactly there. When the true
# density is known, T1 is exact and beats all of them.

# %% [markdown]
# ## 4. Figures: the samples side by side

# %%
fig, axes = plt.subplots(2, 5, figsize=(20, 8), sharex=True, sharey=True)
for ax, (label, x) in zip(axes.flat, samples.items()):
    x = x.detach().cpu()
    in_gap = moon.log_prob(x) < threshold
    ax.scatter(x[~in_gap, 0], x[~in_gap, 1], s=1, alpha=0.4, color="tab:blue")
    ax.scatter(x[in_gap, 0], x[in_gap, 1], s=4, color="tab:red", label="in a gap")
    m = metrics[label]
    ax.set_title(
        f"{label}\ngap mass {m['gap_mass']:.4f}, energy dist. {m['energy_distance']:.4f}", fontsize=9
    )
    ax.set_xlim(-3.5, 3.5)
    ax.set_ylim(-3.5, 3.5)
    ax.set_aspect("equal")
axes.flat[0].legend(loc="lower right", fontsize=8)
for ax in axes.flat[len(samples) :]:
    ax.axis("off")
fig.suptitle("Double moon: samples in red fall in the low-density gaps (true density below the 0.1% level)")
fig.tight_layout()
fig.savefig(FIGURES / f"01_samples{SUFFIX}.png", dpi=110)

# %% [markdown]
# ## 5. Figures: the latent space
# Colour by log|det J_f(z)| (the stretch), by log q_Z(z) (naive sampling), and by the tempered
# target with beta = 1: the bands where the flow stretches are the bridges, and T2 is small there.

# %%
latent = LatentFlow(flow)
grid = torch.linspace(-3.5, 3.5, 200 if not SMOKE else 40)
zz = torch.stack(torch.meshgrid(grid, grid, indexing="xy"), -1).reshape(-1, 2)
with torch.no_grad():
    _, ladj = latent.to_data(zz)
    log_q = latent.base_log_prob(zz)
panels = [
    ("log|det J_f(z)| (stretch)", ladj, "magma"),
    ("log q_Z(z) (naive sampling)", log_q, "viridis"),
    ("log pi_1(z) = log q_Z(z) - log|det J_f(z)|", log_q - ladj, "viridis"),
]
fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
shape = (len(grid), len(grid))
for ax, (title, values, cmap) in zip(axes, panels):
    values = values.reshape(shape)
    if "pi_1" in title:
        values = values.clamp(min=values.max() - 15)
    image = ax.pcolormesh(grid, grid, values, cmap=cmap, shading="auto")
    fig.colorbar(image, ax=ax)
    ax.set_title(title, fontsize=10)
    ax.set_aspect("equal")
    ax.set_xlabel("z1")
axes[0].set_ylabel("z2")
fig.tight_layout()
fig.savefig(FIGURES / f"01_latent{SUFFIX}.png", dpi=110)

fig, ax = plt.subplots(figsize=(5, 3))
ax.plot(fit.losses, lw=0.5)
ax.set(xlabel="Adam step", ylabel="minibatch NLL", title="Training the flow on the double moon")
fig.tight_layout()
fig.savefig(FIGURES / f"01_fit_loss{SUFFIX}.png", dpi=110)
print(f"figures written to {FIGURES}")
