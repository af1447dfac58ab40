"""The VNet a benchmark runs: the experiments' base config resized, random weights."""

import dataclasses

import ml_collections

from vnet_jax import model as model_lib
from vnet_jax.experiments import base


@dataclasses.dataclass(frozen=True)
class ModelSettings:
  """The model flags shared by `train` and `infer` (the bench's defaults: a small VNet)."""

  filters: tuple[int, ...] = (8, 16, 32, 32, 32)
  dtype: str = "float32"  # compute dtype; parameters stay float32
  conv_impl: str = "auto"
  seed: int = 0

  def build(
    self,
    num_classes: int,
    in_channels: int,
    patch: tuple[int, int, int],
    per_device_batch: int = 1,
    bn_axis_name: str | None = None,
  ) -> tuple[ml_collections.ConfigDict, model_lib.VNet]:
    """The run config and VNet as training would build them from these settings."""
    config = base.get_config()
    config.seed = self.seed
    config.patch_size = patch
    config.per_device_batch_size = per_device_batch
    config.compute_dtype = self.dtype
    config.model.filters = self.filters
    config.model.conv_impl = self.conv_impl
    return config, model_lib.build_model(config, num_classes, in_channels, bn_axis_name)
