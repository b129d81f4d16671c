"""Command-line options that override a config value, validated as presets.yaml is.

``model_copy(update=...)`` skips pydantic's checks, so a bench or simulation option applied that way
would train with a value the server refuses at start. Each option goes through here instead and a
bad value stops the command with the option and the config key it sets.
"""

from __future__ import annotations

import argparse
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


def _merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in changes.items():
        nested = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merged(out[key], value) if nested else value
    return out


def with_option(config: M, option: str, changes: dict[str, Any], prefix: str = "training") -> M:
    """``config`` with ``changes`` (nested dicts merged key by key) validated again.

    ``option`` is the option as typed (``"--synth-lesions 1.5"``); ``prefix`` names ``config``'s
    place in its file for the message (``""`` for a whole file's model).
    """
    try:
        return type(config).model_validate(_merged(config.model_dump(), changes))
    except ValidationError as err:
        e = err.errors()[0]
        key = ".".join([*([prefix] if prefix else []), *map(str, e["loc"])])
        raise SystemExit(f"{option}: {e['msg']} ({key})") from None


def with_recipe_options(training: M, args: argparse.Namespace) -> M:
    """``training`` with the recipe options a command has and was given: ``--seed``,
    ``--crop-order``, ``--dice-over``, ``--lesion-weight``, ``--augment``, ``--synth-lesions``,
    ``--synth-contrast``, ``--patch`` (on every device: the CPU overrides would otherwise replace it)."""
    from lib.model.metrics import LESION_CLASS

    t = training
    if getattr(args, "seed", None) is not None:
        t = with_option(t, f"--seed {args.seed}", {"seed": args.seed})
    for name in ("crop_order", "dice_over"):
        if getattr(args, name, None):
            t = with_option(t, f"--{name.replace('_', '-')} {getattr(args, name)}", {name: getattr(args, name)})
    if getattr(args, "lesion_weight", None) is not None:
        t = with_option(t, f"--lesion-weight {args.lesion_weight:g}",
                        {"crop_class_weights": {**t.crop_class_weights, LESION_CLASS: args.lesion_weight}})
    for name, key in (("augment", "augment"), ("synth_lesions", "lesion_synthesis")):
        if getattr(args, name, None) is not None:
            value = getattr(args, name)
            t = with_option(t, f"--{name.replace('_', '-')} {value:g}", {key: {"probability": value}})
    if getattr(args, "synth_contrast", None):
        lo, hi = args.synth_contrast
        t = with_option(t, f"--synth-contrast {lo:g} {hi:g}", {"lesion_synthesis": {"contrast_hu": (lo, hi)}})
    if getattr(args, "patch", None):
        patch = tuple(args.patch)
        t = with_option(t, f"--patch {' '.join(map(str, patch))}", {"patch_size": patch, "cpu": {"patch_size": patch}})
    return t


__all__ = ["with_option", "with_recipe_options"]
