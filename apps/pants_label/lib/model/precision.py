"""The arithmetic the networks run in: float16 mixed precision on a GPU, bfloat16 on a CPU that
computes it natively (Intel AMX or AVX-512 BF16, AMD Zen 4 and later), float32 elsewhere.

On the 2-core benchmark box (Xeon with AMX), one 144x112x136 window of the 28-class SegResNet takes
1.05 s in bfloat16 against 2.56 s in float32, and a training step of 64x64x72 0.57 s against
1.14 s. A CPU without native bfloat16 would emulate it, slower than float32: ``auto`` turns it on
only where the CPU says it has it (``configs/presets.yaml`` ``cpu_bf16``).
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import ContextManager, Literal

import torch

CpuBf16 = Literal["auto", "on", "off"]

#: /proc/cpuinfo flags of CPUs with bfloat16 arithmetic in hardware
_NATIVE_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})
#: ``auto`` trains in bfloat16 only on these: on an AMD EPYC with AVX-512 BF16 and no AMX, bfloat16
#: training made NaN weights in half of the active-learning campaign tests (float32: none)
_TRAIN_FLAGS = frozenset({"amx_bf16"})


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (Linux: /proc/cpuinfo; elsewhere: none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def native_cpu_bf16(flags: frozenset[str] = _NATIVE_FLAGS) -> bool:
    """Whether this CPU has any of ``flags`` (by default: computes bfloat16 natively)."""
    return bool(flags & _cpu_flags())


def resolve_cpu_bf16(setting: CpuBf16, training: bool = False) -> bool:
    """``on``/``off`` as said; ``auto``: on where the CPU has it natively (for training: AMX)."""
    return setting == "on" or (setting == "auto" and native_cpu_bf16(_TRAIN_FLAGS if training else _NATIVE_FLAGS))


def autocast(device: torch.device, cpu_bf16: bool) -> ContextManager:
    """The autocast context the networks run in on ``device``."""
    if device.type == "cuda":
        return torch.autocast("cuda")
    if cpu_bf16:
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def describe(device: torch.device, cpu_bf16: bool) -> str:
    """What ``/info`` and model cards say: ``float16 mixed`` / ``bfloat16 mixed`` / ``float32``."""
    if device.type == "cuda":
        return "float16 mixed"
    return "bfloat16 mixed" if cpu_bf16 else "float32"


__all__ = ["CpuBf16", "autocast", "describe", "native_cpu_bf16", "resolve_cpu_bf16"]
