r"""The seed notebook's recipe on FLARE22: 4 classes, weighted Dice + focal, Adam 1e-4, 128^3,
batch 2.

  python -m vnet_jax.main --experiment=seed --fold=0 --data_dir=data/FLARE22Train

Organs are grouped into 3 foreground classes by `data.label_map` (default: liver; both kidneys;
spleen), e.g. `--config.data.label_map="((1,1),(2,2),(13,2),(3,3))"`. The Dice class weights are
the seed's [0.26, 22.53, 22.53, 26.21]; with weights above 1 the Dice loss can go negative, as in
the seed.
"""

from vnet_jax.experiments import base


def get_config():
  c = base.get_config()
  c.data.data_dir = "data/FLARE22Train"
  c.data.label_map = ((1, 1), (2, 2), (13, 2), (3, 3))
  c.data.class_names = ("background", "liver", "kidneys", "spleen")
  c.loss.class_weights = (0.26, 22.53, 22.53, 26.21)
  c.per_device_batch_size = 2
  c.patch_size = (128, 128, 128)
  c.learning_rate = 1e-4
  # The seed trained without augmentation or deep supervision, on Dice + focal.
  c.loss.name = "dice_focal"
  c.loss.focal_clip = 1e-7
  c.model.deep_supervision = False
  return base.switch_off_augmentation(c)
