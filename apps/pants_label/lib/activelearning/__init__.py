"""Choosing the next scan: uncertainty scoring, the strategies MONAI Label serves, the watcher that
rescores on a new model, and automatic retraining.

May import :mod:`lib.core`, :mod:`lib.imaging`, :mod:`lib.model` and the datastore protocol.
"""
