"""Shared defaults for every experiment; each experiment's get_config() overrides a few fields.

Optional fields are typed placeholders so any of them can be set from the command line,
e.g. `--config.loss.class_weights=1,1,1` or `--config.data.target_spacing=2.5,0.8,0.8`.
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.num_folds = 5
  c.split_seed = 12345

  # Training schedule (steps are global optimizer steps).
  c.num_steps = 250_000
  c.per_device_batch_size = 2
  c.patch_size = (128, 128, 128)  # (D, H, W) = (slices, rows, columns)
  c.learning_rate = 1e-4
  c.lr_schedule = "constant"  # "constant", "cosine" or "poly" (these two decay to 0 at num_steps)
  c.warmup_steps = 0
  c.grad_clip_norm = 0.0  # 0 disables clipping
  c.compute_dtype = "float32"  # or "bfloat16" (parameters stay float32)
  c.log_every = 50
  c.eval_every = 5_000
  c.checkpoint_every = 1_000
  c.keep_checkpoints = 3  # the latest few; the best by validation mean Dice is kept as well

  c.model = ml_collections.ConfigDict()
  c.model.filters = (16, 32, 64, 128, 128)
  c.model.kernel_size = 3
  c.model.batch_norm = True
  c.model.dropout_rate = 0.1
  c.model.downsample = "conv"  # "conv" or "maxpool"
  c.model.conv_impl = "auto"  # "auto": depth-split 2D convs on CPU, native 3D convs on GPU
  # nnU-Net's deep supervision: extra loss heads at 1/2, 1/4, ... of the resolution (training only).
  c.model.deep_supervision = False

  c.loss = ml_collections.ConfigDict()
  # "dice_focal": the seed's Dice + focal_weight x focal; "dice_ce": nnU-Net's foreground batch
  # Dice + ce_weight x cross-entropy (vnet_jax/losses.py).
  c.loss.name = "dice_focal"
  c.loss.ce_weight = 1.0
  c.loss.class_weights = config_dict.placeholder(tuple)  # None: equal weights
  c.loss.normalize_class_weights = False  # divide weights by their mean: keeps Dice loss in [0, 1]
  c.loss.focal_weight = 1.0
  c.loss.focal_alpha = 0.25
  c.loss.focal_gamma = 2.0
  # None: focal loss from log-softmax, never a dead gradient; 1e-7: the seed's clipped focal loss,
  # whose gradient vanishes for an organ once its probability is below the clip.
  c.loss.focal_clip = config_dict.placeholder(float)
  c.loss.smooth = 1e-5

  c.data = ml_collections.ConfigDict()
  c.data.data_dir = config_dict.placeholder(str)
  c.data.cache_dir = config_dict.placeholder(str)  # None: $VNET_JAX_CACHE or ~/.cache/vnet_jax
  c.data.target_spacing = config_dict.placeholder(tuple)  # (z, y, x) mm; None: dataset median
  c.data.normalization = config_dict.placeholder(tuple)  # per channel 'ct'|'zscore'|'none'
  c.data.ct_window = config_dict.placeholder(tuple)  # (lo, hi) HU; None: foreground percentiles
  c.data.crop_to_nonzero = True
  c.data.image_dtype = "float32"
  c.data.label_map = config_dict.placeholder(tuple)  # ((original, new), ...); unlisted -> 0
  c.data.class_names = config_dict.placeholder(tuple)  # names after label_map, background first
  c.data.preprocess_workers = 2
  c.data.loader_workers = 0  # Grain worker processes (0: in the training process)
  c.data.foreground_fraction = 1 / 3
  # > 0: generate a synthetic FLARE22-like dataset when data_dir is missing.
  c.data.synthetic_cases = 0
  c.data.synthetic_size = config_dict.placeholder(tuple)  # (x, y, z) voxels of synthetic cases

  # On the devices, inside the train step (vnet_jax/augment.py); every field is required.
  # nnU-Net v2's probabilities (per sample) and ranges, mirroring off.
  c.augment = ml_collections.ConfigDict()
  c.augment.rotation_prob = 0.2
  c.augment.rotation_range_deg = 30.0  # about each axis; in-plane only for anisotropic spacing
  c.augment.scaling_prob = 0.2
  c.augment.scaling_range = (0.7, 1.4)  # the same factor on every axis; > 1 zooms in
  c.augment.elastic_prob = 0.0
  c.augment.elastic_alpha = 4.0  # largest displacement, voxels
  c.augment.elastic_sigma = 10.0  # smoothness of the displacement field, voxels
  # Off: FLARE22 labels kidneys and adrenals by side, and mirroring swaps them.
  c.augment.mirror_prob = 0.0
  c.augment.mirror_axes = (0, 1, 2)
  c.augment.noise_prob = 0.1
  c.augment.noise_variance = (0.0, 0.1)
  c.augment.blur_prob = 0.2
  c.augment.blur_sigma = (0.5, 1.0)
  c.augment.blur_channel_prob = 0.5
  c.augment.brightness_prob = 0.15  # multiplicative
  c.augment.brightness_range = (0.75, 1.25)
  c.augment.contrast_prob = 0.15
  c.augment.contrast_range = (0.75, 1.25)
  c.augment.lowres_prob = 0.25  # low-resolution simulation
  c.augment.lowres_zoom = (0.5, 1.0)
  c.augment.lowres_channel_prob = 0.5
  c.augment.gamma_prob = 0.3
  c.augment.gamma_range = (0.7, 1.5)
  c.augment.inverted_gamma_prob = 0.1

  c.inference = ml_collections.ConfigDict()
  c.inference.overlap = 0.5
  c.inference.tta = False
  c.inference.windows_per_device = 1
  c.inference.nsd_tolerance_mm = 2.0  # NSD tolerance for classes outside the FLARE22 organ table
  return c


def switch_off_augmentation(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Sets the probability of every augmentation in `c.augment` to 0; returns c."""
  for field in list(c.augment):
    if field.endswith("_prob"):
      c.augment[field] = 0.0
  return c
