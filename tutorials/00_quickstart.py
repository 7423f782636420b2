# %% [markdown]
# # Quickstart: a Pyro posterior sampled exactly in the latent space of a flow
#
# A Bayesian logistic regression with strongly correlated predictors has a narrow, tilted
# posterior: plain MALA must take tiny steps along its short axis. We
#
# 1. fit a zuko flow to the posterior by variational inference (`fit_flow_to_model`),
# 2. sample with `MCMC(NFMALA(model, flow=flow))`: latent-space MALA on the exact pull-back of
#    the posterior, so the answer is exact whatever the flow's quality,
# 3. read the run with ArviZ, per-draw sample stats included,
#
# and compare with the same kernel on an *untrained* flow, to see what the flow buys.
#
# Run: `python tutorials/00_quickstart.py` (about a minute on 2 cores);
# `SMOKE_TEST=1` shrinks it to seconds.

# %%
import os
import time

from pathlib import Path

import arviz as az
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import torch  # noqa: E402

from pyro.infer import MCMC  # noqa: E402

from pyro_nfmala import NFMALA, default_flow, fit_flow_to_model, to_inference_data  # noqa: E402

SMOKE = os.environ.get("SMOKE_TEST") == "1"
FIGURES = Path(__file__).resolve().parent / "figures"
FIGURES.mkdir(exist_ok=True)
SUFFIX = "_smoke" if SMOKE else ""
torch.set_num_threads(2)
pyro.set_rng_seed(0)

# %% [markdown]
# ## Data and model
# 200 observations; the two predictors have correlation 0.95.

# %%
num_obs = 200
covariance = torch.tensor([[1.0, 0.95], [0.95, 1.0]])
features = dist.MultivariateNormal(torch.zeros(2), covariance).sample((num_obs,))
true_weights = torch.tensor([1.5, -1.0])
labels = dist.Bernoulli(logits=0.5 + features @ true_weights).sample()


def model(features, labels):
    bias = pyro.sample("bias", dist.Normal(0.0, 5.0))
    weights = pyro.sample("weights", dist.Normal(0.0, 5.0).expand([2]).to_event(1))
    with pyro.plate("data", len(labels)):
        pyro.sample("obs", dist.Bernoulli(logits=bias + features @ weights), obs=labels)


# %% [markdown]
# ## 1. Fit a flow to the posterior (reverse KL)

# %%
start = time.perf_counter()
fit = fit_flow_to_model(
    model, features, labels, flow=default_flow(3), num_steps=30 if SMOKE else 600, progress=not SMOKE
)
fit_seconds = time.perf_counter() - start
print(f"flow fitted in {fit_seconds:.1f} s, final loss (minus ELBO) {sum(fit.losses[-20:]) / 20:.2f}")

fig, ax = plt.subplots(figsize=(5, 3))
ax.plot(fit.losses)
ax.set(xlabel="Adam step", ylabel="loss = -ELBO", title="Fitting the flow by variational inference")
finite = sorted(loss for loss in fit.losses if loss == loss)
ax.set_ylim(finite[0] - 0.2, finite[int(0.95 * len(finite))])
fig.tight_layout()
fig.savefig(FIGURES / f"00_fit_loss{SUFFIX}.png", dpi=120)

# %% [markdown]
# ## 2. Sample with NFMALA: fitted flow against an untrained one

# %%
num_samples, warmup_steps = (30, 30) if SMOKE else (1000, 500)
runs = {}
for label, flow in [("fitted flow", fit.flow), ("untrained flow", default_flow(3))]:
    kernel = NFMALA(model, flow=flow)
    mcmc = MCMC(
        kernel, num_samples=num_samples, warmup_steps=warmup_steps, num_chains=2, disable_progbar=SMOKE
    )
    start = time.perf_counter()
    mcmc.run(features, labels)
    seconds = time.perf_counter() - start
    runs[label] = (to_inference_data(mcmc), seconds)

# %% [markdown]
# ## 3. Read the runs with ArviZ

# %%
rows = []
for label, (idata, seconds) in runs.items():
    summary = az.summary(idata, kind="diagnostics")
    stats = idata.sample_stats
    rows.append(
        f"| {label} | {float(stats['step_size'].mean()):.3g} | {float(stats['accept_prob'].mean()):.2f} "
        f"| {summary['ess_bulk'].min():.0f} | {summary['ess_bulk'].min() / seconds:.1f} "
        f"| {summary['r_hat'].max():.3f} | {int(stats['diverging'].sum())} |"
    )
print("| flow | step size | accept | min ESS bulk | min ESS/s | max R-hat | divergences |")
print("| --- | --- | --- | --- | --- | --- | --- |")
print("\n".join(rows))
print(az.summary(runs["fitted flow"][0]))

# %%
idata = runs["fitted flow"][0]
az.plot_trace(idata, compact=True)
plt.gcf().tight_layout()
plt.savefig(FIGURES / f"00_trace{SUFFIX}.png", dpi=100)

az.plot_pair(idata, kind="scatter", marginals=True, scatter_kwargs={"alpha": 0.3})
plt.savefig(FIGURES / f"00_pair{SUFFIX}.png", dpi=100)
print(f"figures written to {FIGURES}")
