"""Tiny label volumes whose scores can be worked out by hand."""

import numpy as np


def cube(shape=(10, 10, 10), lo=(3, 3, 3), size=4, label=1, dtype=np.uint8):
  a = np.zeros(shape, dtype)
  a[lo[0] : lo[0] + size, lo[1] : lo[1] + size, lo[2] : lo[2] + size] = label
  return a


def tube(z_lo, z_hi, label, shape=(8, 8, 12), axis=2):
  """A 2x2 column of `label` on slices z_lo..z_hi-1 along `axis`."""
  a = np.zeros(shape, np.uint8)
  idx = [slice(3, 5)] * 3
  idx[axis] = slice(z_lo, z_hi)
  a[tuple(idx)] = label
  return a
