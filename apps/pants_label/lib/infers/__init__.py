"""MONAI Label infer tasks: thin wrappers over :mod:`lib.model.segmenter`."""
