"""``pants-label``: one command for every script in ``scripts/``.

``pants-label make-phantoms --out data/demo`` runs ``scripts/make_phantoms.py --out data/demo``
with the virtual environment's Python, so README commands work without activating anything.
The scripts stay plain files (``python scripts/X.py`` keeps working); this command finds them in
the checkout the package is installed from (``pip install -e .``, done by ``make setup``).
"""

from __future__ import annotations

import argparse
import ast
import runpy
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def commands() -> dict[str, Path]:
    """Subcommand name (``make-phantoms``) -> script path, for every script in ``scripts/``."""
    return {p.stem.replace("_", "-"): p for p in sorted(SCRIPTS.glob("*.py"))}


def summary(script: Path) -> str:
    """First line of a script's docstring, for the command list."""
    doc = ast.get_docstring(ast.parse(script.read_text()))
    return doc.splitlines()[0] if doc else ""


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    cmds = commands()
    listing = "\n".join(f"  {name:<22}{summary(path)}" for name, path in cmds.items())
    parser = argparse.ArgumentParser(
        prog="pants-label",
        description="Run one of PanTS Label's tools. `pants-label COMMAND --help` shows its options.",
        epilog=f"commands:\n{listing}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=sorted(cmds), metavar="COMMAND", help="one of the commands below")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the command's own options")
    ns = parser.parse_args(argv[:1] or ["--help"])
    script = cmds[ns.command]
    sys.argv = [str(script), *argv[1:]]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
