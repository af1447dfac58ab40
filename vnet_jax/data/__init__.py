"""Datasets: layouts, validation, preprocessing cache, folds, Grain pipeline, synthetic data."""
