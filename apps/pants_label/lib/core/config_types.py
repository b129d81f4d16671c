"""Field types the config models share, so a rule such as "weights are never negative" is written once.

pydantic names the offending key in its error (e.g. ``strategies.class_weights.pancreatic_lesion``),
which the config loaders turn into the message that stops the server.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

#: per-class weights (class name -> weight >= 0)
NonNegativeWeights = dict[str, Annotated[float, Field(ge=0)]]
#: per-class counts (class name -> count >= 1)
PositiveCounts = dict[str, Annotated[int, Field(ge=1)]]

__all__ = ["NonNegativeWeights", "PositiveCounts"]
