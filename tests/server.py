"""Starting the real MONAI Label server for tests: ``monailabel start_server`` on a loopback port."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from pants_tools.processes import free_port, stop_process, wait_until_answers  # noqa: F401 - used by tests

REPO = Path(__file__).resolve().parents[1]
APP_DIR = REPO / "apps" / "pants_label"


class Server:
    """A ``monailabel start_server --app apps/pants_label`` subprocess; ``stop()`` ends it.

    Args:
        studies: the ``--studies`` folder (or DICOMweb URL).
        log: file that receives the server's output (shown when start-up fails).
        conf: ``--conf key value`` pairs.
        timeout: seconds to wait for ``/info/``.
    """

    def __init__(
        self,
        studies: Path | str,
        log: Path,
        conf: dict[str, str] | None = None,
        timeout: float = 180,
        app_dir: Path | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        """``app_dir`` serves another app (benchmarks run the radiology sample app this way)."""
        self.root = studies
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(log)
        cmd = [
            sys.executable, "-m", "monailabel.main", "start_server", "--app", str(app_dir or APP_DIR),
            "--studies", str(studies), "--host", "127.0.0.1", "--port", str(self.port),
        ]
        for key, value in (conf or {}).items():
            cmd += ["--conf", key, str(value)]
        # The launcher runs training in a subprocess that calls `python`: keep our venv first on PATH.
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""), **(extra_env or {})}
        self._fh = open(self.log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._fh, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        try:
            wait_until_answers(self.proc, f"{self.url}/info/", timeout, "server", self.tail)
        except RuntimeError:
            self._fh.close()
            raise

    def tail(self, n: int = 4000) -> str:
        self._fh.flush()
        return self.log.read_text()[-n:]

    def stop(self) -> None:
        stop_process(self.proc)
        self._fh.close()


def run_server_expecting_failure(studies: Path | str, conf: dict[str, str], timeout: float = 120) -> tuple[int, str]:
    """Start the server with settings that must stop it; returns (exit code, output)."""
    cmd = [
        sys.executable, "-m", "monailabel.main", "start_server", "--app", str(APP_DIR), "--studies", str(studies),
        "--host", "127.0.0.1", "--port", str(free_port()),
    ]
    for key, value in conf.items():
        cmd += ["--conf", key, str(value)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    return proc.returncode, proc.stdout + proc.stderr
