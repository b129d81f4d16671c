"""The app's vocabulary: the label map, validated settings (presets, active learning), the error
type every layer raises, and atomic file writes.

Imports nothing of ours: every other subpackage may import it.
"""
