#!/usr/bin/env python
"""Train the demo model that ``make serve`` serves: the learning benchmark's run, with its weights kept.

This is ``scripts/bench_learning.py`` with fixed arguments (below): 40 adult-size phantoms from the
five phantom centers (about 11% with a lesion, data seed 0), the app's own train task from scratch
(``POST /train/segmentation``'s code, the CPU recipe of ``configs/presets.yaml``),
2,400 steps, training seed 0, then a test on 10 held-out phantoms (5 with a lesion). It writes
``apps/pants_label/demo_model/segresnet_fast.pt`` with a model card (``model_card.json`` beside it,
and in the weights file, which ``/info`` shows as ``model_card``) that says it is a phantom model,
not for real CT, with its test Dice, CPU time and the command.

CPU time, seed 0, 2-core box (torch 2.13, 2 threads): about 55 min of training (README "Learning
benchmark" has the measured figure). Extra arguments go to bench_learning.py and override these.

``--second-stage`` trains infer's pancreas stage instead (``scripts/bench_two_stage.py`` on the
same phantoms, over the committed whole-body model, 1,200 steps, seed 0): it writes
``segresnet_pancreas.pt`` and ``model_card_pancreas.json``. About 40 min wall, 70 CPU-min on the
2-core box (README "Second stage").

Examples:
    .venv/bin/pants-label train-demo-model
    .venv/bin/pants-label train-demo-model --steps 200 --save-model /tmp/demo_model
    .venv/bin/pants-label train-demo-model --second-stage
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))  # bench_learning.py lives beside this script

import bench_learning  # noqa: E402
import bench_two_stage  # noqa: E402

DEMO_ARGS = ["--out", str(REPO / "out" / "demo_model"), "--n-train", "40", "--n-test", "10", "--test-lesions", "5",
             "--data-seed", "0", "--seed", "0", "--steps", "2400", "--evals", "6", "--lr", "3e-3",
             "--save-model", str(REPO / "apps" / "pants_label" / "demo_model")]


# the pancreas stage: the same phantoms and seeds, its own output folder for the test summary
SECOND_STAGE_ARGS = [*DEMO_ARGS, "--out", str(REPO / "out" / "demo_model_pancreas"), "--steps", "1200"]


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    if "--second-stage" in argv:
        rest = [a for a in argv if a != "--second-stage"]
        return bench_two_stage.main(SECOND_STAGE_ARGS + rest)  # later arguments win in argparse
    return bench_learning.main(DEMO_ARGS + list(argv))


if __name__ == "__main__":
    sys.exit(main())
