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
  c.lr_schedule = "constant"  # "constant" or "cosine" (decays to 0 at num_steps)
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

  c.loss = ml_collections.ConfigDict()
  c.loss.class_weights = config_dict.placeholder(tuple)  # None: equal weights
  c.loss.normalize_class_weights = False  # divide weights by their mean: keeps Dice loss in [0, 1]
  c.loss.focal_weight = 1.0
  c.loss.focal_alpha = 0.25
  c.loss.focal_gamma = 2.0
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

  # Every field of data.augment.AugmentConfig (it has no defaults). nnU-Net v2's probabilities
  # and ranges, except flips (off) and the additive shift (not in nnU-Net).
  c.augment = ml_collections.ConfigDict()
  # Off: FLARE22 labels kidneys and adrenals by side, and mirroring swaps them.
  c.augment.flip_prob = 0.0
  c.augment.flip_axes = (0, 1, 2)
  c.augment.scale_prob = 0.15  # multiplicative brightness
  c.augment.scale_range = (0.75, 1.25)
  c.augment.contrast_prob = 0.15
  c.augment.contrast_range = (0.75, 1.25)
  c.augment.shift_prob = 0.15  # additive brightness, in normalised intensity units
  c.augment.shift_range = (-0.1, 0.1)
  c.augment.noise_prob = 0.1
  c.augment.noise_variance = (0.0, 0.1)
  c.augment.gamma_prob = 0.3
  c.augment.gamma_range = (0.7, 1.5)
  # Rotation and zoom off: scipy's affine_transform costs ~0.1 s per 128^3 patch on a CPU.
  c.augment.rotation_prob = 0.0
  c.augment.rotation_range_deg = 30.0
  c.augment.rotation_in_plane_only = False
  c.augment.scaling_prob = 0.0
  c.augment.scaling_range = (0.7, 1.4)  # > 1 zooms in

  c.inference = ml_collections.ConfigDict()
  c.inference.overlap = 0.5
  c.inference.tta = False
  c.inference.windows_per_device = 1
  c.inference.nsd_tolerance_mm = 2.0  # NSD tolerance for classes outside the FLARE22 organ table
  return c
