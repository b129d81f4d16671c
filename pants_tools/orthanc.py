"""Starting a real Orthanc (with its DICOMweb plugin) from ``configs/orthanc.json``, for tests and
benchmarks.

Each instance runs as our own process on a free loopback port with its own storage folder, so
it never meets a system Orthanc service (which, on Debian, listens on 8042 with /var/lib/orthanc).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request
from pathlib import Path

from pants_tools.processes import free_port, stop_process, wait_until_answers

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "orthanc.json"
ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"


class Orthanc:
    """An ``Orthanc`` subprocess on ``127.0.0.1:<free port>`` storing into ``storage``.

    Attributes:
        url: the REST root; ``dicomweb``: the DICOMweb root (``url + "/dicom-web"``).
    """

    def __init__(self, storage: Path, log: Path, timeout: float = 30) -> None:
        self.storage = Path(storage)
        self.storage.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dicomweb = f"{self.url}/dicom-web"
        cfg = json.loads(CONFIG.read_text())
        cfg.update(HttpPort=self.port, StorageDirectory=str(self.storage), IndexDirectory=str(self.storage))
        self.config = self.storage / "orthanc.json"
        self.config.write_text(json.dumps(cfg, indent=2))
        self.log = Path(log)
        self.timeout = timeout
        self.start()

    def start(self) -> None:
        """Start (or start again, on the same port and storage) the Orthanc process."""
        self._fh = open(self.log, "a")
        self.proc = subprocess.Popen([ORTHANC, str(self.config)], stdout=self._fh, stderr=subprocess.STDOUT)
        try:
            wait_until_answers(self.proc, f"{self.dicomweb}/studies", self.timeout, "Orthanc",
                               lambda: self.log.read_text()[-3000:])
        except RuntimeError:
            self._fh.close()
            raise

    def get(self, path: str) -> object:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=30) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        stop_process(self.proc)
        self._fh.close()


__all__ = ["Orthanc", "CONFIG", "ORTHANC"]
