"""Datasets, from the user's NIfTI files to training batches.

- `layouts`: FLARE22 and nnU-Net v2 dataset discovery, the FLARE22 class table, case ids.
- `dicom`: DICOM series discovery and reading (SimpleITK) into in-memory NIfTI images.
- `validation`: header and content checks of the NIfTI files (one-line `DataError`s).
- `plan`: `PreprocessSettings`, the plan (plan.json) with its CT statistics, the cache hash.
- `geometry`: RAS reorientation to and from the package's (z, y, x), crop boxes, affines.
- `resample`: trilinear resampling of images and one-hot labels, and its grid convention.
- `preprocess`: the per-case transform, `preprocess_image`, mapping predictions back, NIfTI out.
- `cache`: the on-disk preprocessed cache: `prepare_dataset`, `open_cache`, `load_case`.
- `folds`: `splits.json` and fold selection.
- `patches`: the Grain case source, patch crops and foreground oversampling.
- `pipeline`: shuffled, sharded, resumable training batches (`make_train_dataset`).
- `synthetic`: a FLARE22-like synthetic dataset generator.
"""
