"""The benchmarks behind `python -m vnet_jax.bench` (the command line is vnet_jax/bench.py).

- `train_step`: the pmap'd train step on random data: time, FLOPs, efficiency, memory.
- `predict_path`: `predict.predict_path` on copies of one synthetic NIfTI case: seconds per case
  and per stage, peak RSS.
- `loader`: the Grain training pipeline's patches per second on a preprocessed cache.
- `models`: the random-weight VNet they run, built from the experiments' base config.
- `machine`: what the figures were measured on, and its matrix-product peak.
- `synthetic_cache`: synthetic NIfTI cases preprocessed by the package into its cache.

Each benchmark is a `run(...)` returning the dict that the command prints as its JSON line.
"""
