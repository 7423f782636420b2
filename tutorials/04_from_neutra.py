# %% [markdown]
# # From NeuTra to NFMALA: a flow trained by SVI, sampled exactly two ways
#
# Pyro users who already train a normalizing-flow guide (`AutoIAFNormal`, `AutoNormalizingFlow`) often
# hand it to `NeuTraReparam` and run NUTS in the flow's latent space (Hoffman et al., 2019). The same
# trained guide plugs into NFMALA as it is: `NFMALA(model, flow=guide)` reads the map the guide defines
# (`guide.get_transform()`, its base `guide.get_base_dist()`, the model's unconstrained sites in the
# order they run, as `NeuTraReparam` reads them) and runs exact MALA on the posterior pulled back through
# it, each step followed by an independence move from the flow's base. We
#
# 1. train an `AutoIAFNormal` guide on the centred eight schools (a funnel in its own coordinates) by SVI;
# 2. run NUTS on `NeuTraReparam(guide)` and `NFMALA(model, flow=guide)` on the same trained guide;
# 3. compare the posteriors they give (means and sds in sd units) and their effective sample sizes per
#    second, the SVI time counted in both.
#
# Run: `python tutorials/04_from_neutra.py` (about 10 minutes on 2 cores, most of it SVI and Pyro's NUTS,
# measured with another job on the cores); `SMOKE_TEST=1` shrinks it to
# seconds.

# %%
import os
import time
import warnings

from pathlib import Path

import arviz as az
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyro  # noqa: E402
import torch  # noqa: E402

from pyro import poutine  # noqa: E402
from pyro.infer import NUTS, SVI, Trace_ELBO  # noqa: E402
from pyro.infer.autoguide import AutoIAFNormal  # noqa: E402
from pyro.infer.reparam import NeuTraReparam  # noqa: E402

from pyro_nfmala import MCMC, NFMALA, from_arrays  # noqa: E402
from pyro_nfmala.examples.posteriordb import eight_schools_centered, eight_schools_data  # noqa: E402

SMOKE = os.environ.get("SMOKE_TEST") == "1"
FIGURES = Path(__file__).resolve().parent / "figures"
FIGURES.mkdir(exist_ok=True)
SUFFIX = "_smoke" if SMOKE else ""
SVI_STEPS = 50 if SMOKE else 3000
WARMUP, SAMPLES, CHAINS = (20, 20, 2) if SMOKE else (500, 1000, 4)
torch.set_num_threads(2)
pyro.set_rng_seed(0)
data = eight_schools_data()

# %% [markdown]
# ## 1. A flow guide trained by SVI
# Two inverse autoregressive layers on the 10 unconstrained parameters (mu, log tau, theta), the ELBO
# maximized by Adam: the guide every NeuTra example starts from.

# %%
pyro.clear_param_store()
guide = AutoIAFNormal(eight_schools_centered, num_transforms=2, hidden_dim=[40])
svi = SVI(eight_schools_centered, guide, pyro.optim.ClippedAdam({"lr": 5e-3}), Trace_ELBO(num_particles=8))
start = time.perf_counter()
losses = [svi.step(**data) for _ in range(SVI_STEPS)]
svi_seconds = time.perf_counter() - start
print(f"SVI: {SVI_STEPS} steps in {svi_seconds:.1f} s, final loss {np.mean(losses[-100:]):.2f}")

# %% [markdown]
# ## 2. NUTS on NeuTraReparam(guide), and NFMALA on the same guide
# NeuTra: the model reparameterized so that one shared latent site, the flow's base, is sampled; NUTS
# moves there (Pyro runs the chains one after another on these 2 cores). NFMALA: the guide passed as the
# flow, the chains as one batch (`pyro_nfmala.MCMC`).

# %%
neutra = NeuTraReparam(guide.requires_grad_(False))
neutra_model = poutine.reparam(eight_schools_centered, config=lambda _: neutra)
start = time.perf_counter()
with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # "num_chains is more than available_cpu"
    nuts = pyro.infer.MCMC(
        NUTS(neutra_model), num_samples=SAMPLES, warmup_steps=WARMUP, num_chains=CHAINS, disable_progbar=True
    )
    nuts.run(**data)
nuts_seconds = time.perf_counter() - start
(latent,) = nuts.get_samples(group_by_chain=True).values()  # the one site NUTS sampled: the flow's base
# transform_sample one draw at a time (a batch of them clashes with the model's plate in Pyro 1.9)
rows = [neutra.transform_sample(row) for row in latent.reshape(-1, latent.shape[-1])]
neutra_draws = {
    name: torch.stack([row[name] for row in rows]).reshape(CHAINS, SAMPLES, -1) for name in rows[0]
}
neutra_draws = {
    name: value.squeeze(-1) if value.shape[-1] == 1 else value for name, value in neutra_draws.items()
}

start = time.perf_counter()
mcmc = MCMC(
    NFMALA(eight_schools_centered, flow=guide), num_samples=SAMPLES, warmup_steps=WARMUP, num_chains=CHAINS
)
mcmc.run(**data)
nfmala_seconds = time.perf_counter() - start
nfmala_draws = mcmc.get_samples(group_by_chain=True)

# %% [markdown]
# ## 3. The same posterior? How fast?
# Means and sds of mu, log tau and the thetas from both runs, in units of NeuTra's sd; then the smallest
# bulk ESS over the parameters, per second of SVI plus sampling.


# %%
def flat(draws):
    return {
        "mu": draws["mu"].numpy(),
        "log tau": draws["tau"].log().numpy(),
        **{f"theta[{j + 1}]": draws["theta"][..., j].numpy() for j in range(8)},
    }


runs = {"NeuTra + NUTS": flat(neutra_draws), "NFMALA(flow=guide)": flat(nfmala_draws)}
seconds = {"NeuTra + NUTS": svi_seconds + nuts_seconds, "NFMALA(flow=guide)": svi_seconds + nfmala_seconds}
names = list(runs["NeuTra + NUTS"])
reference = runs["NeuTra + NUTS"]
print("| parameter | NeuTra mean (sd) | NFMALA mean (sd) | mean difference / sd |")
print("| --- | --- | --- | --- |")
for name in names:
    a, b = reference[name], runs["NFMALA(flow=guide)"][name]
    difference = (b.mean() - a.mean()) / a.std()
    print(f"| {name} | {a.mean():.2f} ({a.std():.2f}) | {b.mean():.2f} ({b.std():.2f}) | {difference:+.3f} |")
print("\n| sampler | min ESS bulk | max R-hat | seconds (SVI counted) | min ESS bulk per second |")
print("| --- | --- | --- | --- | --- |")
summary = {}
for label, draws in runs.items():
    idata = from_arrays(draws)
    ess = min(float(az.ess(idata, method="bulk")[name].values) for name in names)
    rhat = max(float(az.rhat(idata)[name].values) for name in names)
    summary[label] = ess / seconds[label]
    print(f"| {label} | {ess:.0f} | {rhat:.3f} | {seconds[label]:.1f} | {summary[label]:.1f} |")

# %%
fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 1]})
positions = np.arange(len(names))
for offset, (label, draws) in zip((-0.15, 0.15), runs.items()):
    means = [draws[name].mean() for name in names]
    sds = [draws[name].std() for name in names]
    left.errorbar(positions + offset, means, yerr=sds, fmt="o", capsize=3, label=label)
left.set_xticks(positions, names, rotation=45)
left.set_ylabel("posterior mean +- sd")
left.set_title("the same posterior from one trained guide")
left.legend()
right.bar(list(summary), list(summary.values()), color=["C0", "C1"])
right.set_ylabel("min bulk ESS per second (SVI counted)")
right.tick_params(axis="x", rotation=20)
fig.tight_layout()
fig.savefig(FIGURES / f"04_compare{SUFFIX}.png", dpi=100)

fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(losses, lw=0.5)
ax.set_yscale("symlog")
ax.set_xlabel("SVI step")
ax.set_ylabel("loss (negative ELBO)")
ax.set_title("the guide's training")
fig.tight_layout()
fig.savefig(FIGURES / f"04_svi_loss{SUFFIX}.png", dpi=100)
print(f"figures written to {FIGURES}")
