"""Datasets: layouts, validation, preprocessing cache, folds, Grain pipeline, synthetic data."""


class DataError(ValueError):
  """A problem with the user's data, reported as one readable line naming the file."""
