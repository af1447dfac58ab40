r"""Demo: a small VNet on synthetic FLARE22-like CT, sized for a 2-core CPU (under 10 minutes).

  ./run.sh                        # same as: python -m vnet_jax.main --experiment=demo
  python -m vnet_jax.main --experiment=demo --fold=0 --workdir=runs/demo/fold0

On first use it writes a synthetic FLARE22-layout dataset to WORKDIR/synthetic_data, then
preprocesses it, trains on folds 1-4 with the base config's on-device augmentation, validates
fold 0 with sliding-window inference and prints a per-organ Dice table. Measured 2026-11-30 on a
2-core CPU: 8.5 minutes, mean organ Dice 0.894 (NSD 0.989), every organ at 0.80-0.95.
docs/results.md has the ablation behind this recipe. For a smoke test: --config.num_steps=20.
"""

from vnet_jax.experiments import base


def get_config():
  c = base.get_config()
  c.data.data_dir = None
  c.data.synthetic_cases = 20
  c.data.target_spacing = (4.0, 1.6, 1.6)
  c.data.preprocess_workers = 2
  c.num_steps = 800
  c.per_device_batch_size = 2
  c.patch_size = (32, 64, 64)
  c.learning_rate = 2e-3
  c.lr_schedule = "cosine"
  c.warmup_steps = 50
  c.log_every = 50
  c.eval_every = 250
  c.checkpoint_every = 100
  c.model.filters = (8, 16, 32, 32, 32)
  c.model.dropout_rate = 0.0
  # A stronger per-voxel (focal) term pulls small organs the network does not predict yet back
  # up; Dice alone barely moves an organ whose probability is near 0.
  c.loss.focal_weight = 10.0
  return c
