"""MONAI Label train tasks: the request options and the loop, over :mod:`lib.model`."""
