"""Field types the config models share, so a rule such as "weights are never negative" is written once.

pydantic names the offending key in its error (e.g. ``strategies.class_weights.pancreatic_lesion``),
which the config loaders turn into the message that stops the server.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field


class FrozenConfig(BaseModel):
    """Base of every config model: unknown keys are errors (a typo never passes silently), and a
    loaded config cannot be changed (copies are made with ``model_copy``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


#: per-class weights (class name -> weight >= 0)
NonNegativeWeights = dict[str, Annotated[float, Field(ge=0)]]
#: per-class counts (class name -> count >= 1)
PositiveCounts = dict[str, Annotated[int, Field(ge=1)]]

__all__ = ["FrozenConfig", "NonNegativeWeights", "PositiveCounts"]
