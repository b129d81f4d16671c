"""Checks of a label map against the PanTS annotation standard (PanTS paper, appendix C).

Pure functions on a canonical label map (uint8, ids of ``configs/labels.yaml``), its affine
and the QA settings of ``configs/review.yaml``; no server, no files. One module per group of
checks (:mod:`laterality`, :mod:`pancreas`, :mod:`morphology`); :func:`run_checks` runs them
all and :func:`summary` turns the findings into what image info stores under ``qa``.
"""

from lib.qa.findings import Finding, LabelView, qa_info, run_checks, summary

__all__ = ["Finding", "LabelView", "qa_info", "run_checks", "summary"]
