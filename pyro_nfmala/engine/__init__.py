"""The sampling engine, pure torch (no Pyro model): latent targets, chain states and the one generic
Metropolis-Hastings step with its k-try form (:mod:`~pyro_nfmala.engine.step`), the Langevin and
independence moves, warmup adaptation (step size, mass matrix, the flow refiner), the options, and the
driver of a batch of chains (:mod:`~pyro_nfmala.engine.driver`: one start policy, the schedule of moves,
the ledger). Both front ends run on it."""
