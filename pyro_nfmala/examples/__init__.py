r"""What the tutorials, tests and benchmarks use around the library, kept out of its core.

Nothing here is imported by ``import pyro_nfmala``; import the submodules themselves:

- :mod:`pyro_nfmala.examples.toys`: toy targets with an explicit density and an exact sampler
  (double moon, Gaussian ring and mixture, concentric rings, Neal's funnel, banana);
- :mod:`pyro_nfmala.examples.metrics`: sample-quality metrics against such targets (energy
  distance, mass in the gaps between modes, mode weights, k-NN precision and recall);
- :mod:`pyro_nfmala.examples.posteriordb`: reference posteriors from posteriordb (models in
  Pyro; their data and gold-standard draws read from the folder that ``$PYRO_NFMALA_POSTERIORDB``
  names, never shipped) and standardized errors;
- :mod:`pyro_nfmala.examples.inference_gym`: four harder reference posteriors from inference-gym (a sparse
  logistic regression with heavy-tailed scales, stochastic volatility on 100 and 2,516 returns, an item
  response model; their data and truths read from ``$PYRO_NFMALA_INFERENCE_GYM``) and a Brownian motion
  with unknown scales whose data are generated here;
- :mod:`pyro_nfmala.examples.flow_cases`: posteriors a Gaussian map does not serve (a centred funnel
  in 100 dimensions, a GARCH(1, 1), an approximate GP), data generated with fixed seeds;
- :mod:`pyro_nfmala.examples.baselines`: NeuTra-NUTS on the same flow, the comparator.
"""
