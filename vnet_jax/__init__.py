"""vnet_jax: 3D VNet organ segmentation in JAX/Flax."""

__version__ = "0.1.0"
