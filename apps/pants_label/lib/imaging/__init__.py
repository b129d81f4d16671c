"""Pixels on disk: NIfTI/NRRD volume I/O and orientation, header-first decoding of client files,
CT DICOM series, DICOM SEG, and per-case metadata tables.

May import :mod:`lib.core` only.
"""
