"""bfloat16 mixed precision on the CPU (lib/model/precision.py): where it is used, and that it
segments and trains as float32 does. Runs on any CPU (without native bfloat16 it is emulated)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lib.core.labelmap import load_labelmap
from lib.core.settings import CpuPrecision, load_segmentation_config
from lib.imaging.volume_io import Volume
from lib.model.engine import Engine
from lib.model.precision import describe, native_cpu_bf16, resolve_cpu_bf16
from lib.model.segmenter import Segmenter, build_network
from lib.model.training import dice_ce_loss
from pants_tools.phantom import make_case

LM = load_labelmap()
SEG = load_segmentation_config()
DEMO = Path(__file__).resolve().parents[1] / "apps" / "pants_label" / "demo_model" / "segresnet_fast.pt"


def test_the_setting_resolves_on_off_and_to_the_cpu() -> None:
    assert resolve_cpu_bf16("on") is True and resolve_cpu_bf16("off") is False
    assert resolve_cpu_bf16("auto") is native_cpu_bf16()
    # training's auto needs AMX: with AVX-512 BF16 alone (AMD EPYC) bfloat16 training made NaN weights
    assert resolve_cpu_bf16("auto", training=True) is native_cpu_bf16(frozenset({"amx_bf16"}))
    assert resolve_cpu_bf16("on", training=True) is True and resolve_cpu_bf16("off", training=True) is False
    assert describe(torch.device("cpu"), True) == "bfloat16 mixed"
    assert describe(torch.device("cpu"), False) == "float32"
    assert describe(torch.device("cuda"), False) == "float16 mixed"


def _segmenter(mode: str) -> Segmenter:
    return Segmenter(SEG.model_copy(update={"cpu_bf16": CpuPrecision(infer=mode)}), LM, "fast", DEMO)


def test_bfloat16_segments_as_float32_does() -> None:
    """The demo model on a phantom at physical scale: the label maps agree on almost every voxel
    (bench_precision.py: 0.04% of the held-out phantoms' voxels differ, mean DSC -0.0002)."""
    p = make_case(3, shape=(128, 128, 112), spacing=(2.9, 2.9, 3.6), seed=17, lesion=True)
    vol = Volume(p.ct.astype(np.float32), p.affine)
    f32, b16 = _segmenter("off"), _segmenter("on")
    assert (f32.precision, b16.precision) == ("float32", "bfloat16 mixed")
    a, b = f32.segment(vol)[0], b16.segment(vol)[0]
    assert a.shape == b.shape and (a > 0).any()
    assert (a != b).mean() < 0.005, (a != b).mean()
    assert b16.predict_logits(torch.zeros(1, 1, 16, 16, 16)).dtype == torch.float32


def test_a_bfloat16_training_step_learns_and_keeps_float32_weights() -> None:
    torch.manual_seed(0)
    net = build_network(SEG, LM.num_classes)
    optim = torch.optim.AdamW(net.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.ConstantLR(optim, factor=1.0)
    engine = Engine(net, optim, sched, torch.device("cpu"), torch.channels_last_3d, cpu_bf16=True)
    net.to(memory_format=torch.channels_last_3d)
    assert engine.precision == "bfloat16 mixed"
    x = torch.randn(1, 1, 32, 32, 32)
    y = torch.zeros(1, 1, 32, 32, 32, dtype=torch.int64)
    y[:, :, 8:24, 8:24, 8:24] = LM.id_of("liver")
    x[y == LM.id_of("liver")] += 2.0
    losses = [float(engine.step(x, y, dice_ce_loss)) for _ in range(8)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert all(v.dtype == torch.float32 for v in engine.weights().values())


@pytest.mark.skipif(not native_cpu_bf16(), reason="this CPU has no native bfloat16")
def test_auto_is_on_where_the_cpu_has_it() -> None:
    assert _segmenter("auto").precision == "bfloat16 mixed"
