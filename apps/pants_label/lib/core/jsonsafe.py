"""Values made strict JSON: NaN and infinities become null, numpy scalars plain numbers.

``/info`` and the summaries scripts write are JSON, which has no NaN; metrics legitimately produce it
(a class absent from every test scan).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def json_safe(x: Any) -> Any:
    """``x`` with NaN/inf as None, numpy scalars as Python ones, tuples as lists, keys as str."""
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x
