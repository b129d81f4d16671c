#!/usr/bin/env python
"""List a dataset's model versions, show a card, or roll back to an earlier version (admin).

Works on the model store's files directly, with or without a server running: a running server
serves the rolled-back version at its next inference (the weights are reloaded when the file
changes) and rescores with it, without a restart. Over HTTP, an admin does the same with
POST /model/segmentation/rollback?version=vN (behind the nginx front: admins only).

Examples
  pants-label model-versions --studies data/demo list
  pants-label model-versions --studies data/demo show v2
  pants-label model-versions --studies data/demo rollback v1
  pants-label model-versions --model-dir /srv/models --preset full list
"""

from __future__ import annotations

import argparse
import datetime
import getpass
import json
import sys
from pathlib import Path

from lib.core.errors import ClientError
from lib.datastore.pants import STATE_DIRNAME
from lib.model.model_store import ModelStore
from lib.model.store_location import MODELS_DIRNAME


def model_dir(args: argparse.Namespace) -> Path:
    """As the server finds it: --model-dir, else <state folder>/models of the dataset."""
    if args.model_dir:
        return args.model_dir
    if args.datastore_dir:
        return args.datastore_dir / MODELS_DIRNAME
    if args.studies:
        return args.studies / STATE_DIRNAME / MODELS_DIRNAME
    raise SystemExit("model-versions: give --studies (the dataset), --datastore-dir or --model-dir")


def pick_preset(folder: Path, preset: str | None) -> str:
    found = sorted(p.name for p in (folder / "versions").iterdir() if p.is_dir()) if (folder / "versions").is_dir() else []
    if preset:
        return preset
    if len(found) == 1:
        return found[0]
    raise SystemExit(f"model-versions: {folder} has versions of presets {found or 'none'}; choose one with --preset")


def _when(ts: float | None) -> str:
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M") if ts else "-"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="model_versions.py", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--studies", type=Path, help="the dataset the server serves (its store is <studies>/.pants_label/models)")
    p.add_argument("--datastore-dir", type=Path, help="the server's --conf datastore_dir, if it has one")
    p.add_argument("--model-dir", type=Path, help="the server's --conf model_dir, if it has one")
    p.add_argument("--preset", choices=("fast", "full"), help="needed when the store holds both")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="every version: served mark, time, validation Dice, parent, summary")
    sub.add_parser("show", help="one version's model card (JSON)").add_argument("version")
    sub.add_parser("rollback", help="serve this version again").add_argument("version")
    args = p.parse_args(argv)

    folder = model_dir(args)
    store = ModelStore(folder, pick_preset(folder, args.preset))
    try:
        if args.command == "list":
            serving = store.serving_version()
            print(f"{'':2}{'version':<9}{'created':<18}{'val Dice':>9}  {'parent':<8}summary")
            for c in store.versions():
                dice = (c.get("validation") or {}).get("mean_dice", c.get("val_metric"))
                mark = "* " if c["version"] == serving else "  "
                print(f"{mark}{c['version']:<9}{_when(c.get('created_ts')):<18}"
                      f"{'-' if dice is None else f'{dice:.4f}':>9}  {str(c.get('parent') or '-'):<8}{c.get('summary', '')}")
            if not store.versions():
                print(f"  (no versions in {store.versions_dir})")
        elif args.command == "show":
            print(json.dumps(store.card(args.version), indent=1))
        else:
            out = store.rollback(args.version, by=f"{getpass.getuser()} (model-versions CLI)")
            print(f"now serving {out['version']} (was {out['previous'] or 'none'}): {store.serving_path}")
    except ClientError as err:
        print(f"model-versions: {err.detail}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
