"""The optimisation step every model of the server trains with (the segmentation model, its second
stage, the click model): device placement and memory format, mixed precision with a gradient scaler
on a GPU, optimizer and learning-rate schedule, and the step timing that ``/info`` reports.

What differs between the models (their data, loss and validation) stays with their trainers; what
makes training fast and resumable is written once, here.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

from lib.model.precision import autocast, describe as describe_precision

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class StepTiming:
    """Seconds per step, from the end of one step to the end of the next; :meth:`restart` leaves
    out what happens between steps that is not training (validation, checkpoints)."""

    def __init__(self) -> None:
        self.first_s: float | None = None
        self.fastest_s: float | None = None
        self._last = time.time()

    def restart(self) -> None:
        self._last = time.time()

    def tick(self) -> None:
        now = time.time()
        took, self._last = now - self._last, now
        if self.first_s is None:
            self.first_s = took
        else:  # the least disturbed step: what the loop costs on a busy machine
            self.fastest_s = took if self.fastest_s is None else min(self.fastest_s, took)

    def stats(self) -> dict[str, float]:
        out = {}
        if self.first_s is not None:
            out["first_iteration_s"] = round(self.first_s, 3)
        if self.fastest_s is not None:
            out["fastest_iteration_s"] = round(self.fastest_s, 3)
        return out


class Engine:
    """Runs optimisation steps of ``net`` on ``device``.

    Args:
        net: the network whose weights are trained and saved (already on ``device``).
        optim, sched: its optimizer and a per-step learning-rate schedule.
        device: where the batches go; on CUDA, steps run under float16 autocast with a gradient
            scaler.
        memory_format: of the input batches (``channels_last_3d`` is faster for 3-D convolutions on
            a CPU; the network must have been moved with the same format).
        model: what runs the forward pass when it is not ``net`` itself (a DDP wrapper).
        cpu_bf16: on a CPU, run the steps under bfloat16 autocast (:mod:`lib.model.precision`;
            bfloat16 keeps float32's range, so no scaler is needed).
    """

    def __init__(self, net: torch.nn.Module, optim: torch.optim.Optimizer, sched: Any, device: torch.device,
                 memory_format: torch.memory_format = torch.contiguous_format,
                 model: torch.nn.Module | None = None, cpu_bf16: bool = False) -> None:
        self.net, self.model = net, model if model is not None else net
        self.optim, self.sched, self.device, self.memory_format = optim, sched, device, memory_format
        self.use_amp = device.type == "cuda"
        self.cpu_bf16 = cpu_bf16 and device.type == "cpu"
        self.precision = describe_precision(device, self.cpu_bf16)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.timing = StepTiming()

    def to_device(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (x.to(self.device, non_blocking=True, memory_format=self.memory_format),
                y.to(self.device, non_blocking=True))

    def step(self, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn) -> torch.Tensor:
        """One step on the batch ``(x, y)``; returns the loss, detached, on the device (no sync)."""
        x, y = self.to_device(x, y)
        self.model.train()
        self.optim.zero_grad(set_to_none=True)
        with autocast(self.device, self.cpu_bf16):
            loss = loss_fn(self.model(x), y)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optim)
        self.scaler.update()
        self.sched.step()
        self.timing.tick()
        return loss.detach()

    def state_dict(self) -> dict[str, Any]:
        """Optimizer, schedule and scaler: with the weights, what a resumed run needs."""
        return {"optim": self.optim.state_dict(), "sched": self.sched.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.optim.load_state_dict(saved["optim"])
        self.sched.load_state_dict(saved["sched"])
        self.scaler.load_state_dict(saved["scaler"])

    def weights(self) -> dict[str, torch.Tensor]:
        """A CPU copy of the weights in the default memory format (what infer loads)."""
        return plain_state(self.net)


def plain_state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in net.state_dict().items()}


def publishable(new: float | None, served: float | None) -> bool:
    """The publish rule of every trainer: a run's weights replace the served ones when nothing is
    served yet, or when they score at least as well on the same held-out scans."""
    if served is None:
        return True
    return new is not None and new >= served


def refusal(metric: str, new: float, served: float, scans: int) -> str:
    """Why :func:`publishable` said no, for the refused version's card and the log."""
    return f"{metric} {new:.4f} < served {served:.4f} on the same {scans} scans"


__all__ = ["Engine", "StepTiming", "plain_state", "publishable", "refusal"]
