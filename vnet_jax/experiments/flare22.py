r"""FLARE22: 50 abdominal CTs, background + 13 organs, 5-fold cross-validation.

Get FLARE22Train.zip from Zenodo record 7860267 and unzip it to data/FLARE22Train, then:

  python -m vnet_jax.main --experiment=flare22 --fold=0 --data_dir=data/FLARE22Train

Any nnU-Net v2 dataset (dataset.json + imagesTr/ + labelsTr/) works with the same command:
channels, classes and normalisation come from its dataset.json. The default schedule is
250k steps, sized for a GPU. The recipe (on-device augmentation, Dice + focal, no deep
supervision) is the best of the ablation in docs/results.md; no FLARE22 figure has been measured
with this package yet.
"""

from vnet_jax.experiments import base


def get_config():
  c = base.get_config()
  c.data.data_dir = "data/FLARE22Train"
  return c
