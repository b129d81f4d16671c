"""The network and its numbers: segmenter (preprocessing, network, sliding-window inference),
training data (cache, crops, split), the training step shared by every trainer (engine) and its
arithmetic (precision), the click model, the model store (atomic publish of weights + meta) and
metrics.

May import :mod:`lib.core` and :mod:`lib.imaging`; knows nothing of datastores or HTTP.
"""
