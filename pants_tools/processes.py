"""Small helpers for the local services tools and tests start: a free loopback port, waiting
until a process answers, its peak memory, stopping it."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_gb(pid: int) -> float:
    """A running process's peak resident memory (``VmHWM``) in GB; NaN when it cannot be read."""
    try:
        lines = open(f"/proc/{pid}/status").read().splitlines()
    except OSError:
        return float("nan")
    for line in lines:
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024**2
    return float("nan")


def stop_process(proc: subprocess.Popen, grace: float = 20) -> None:
    """Terminate ``proc``; kill it if it has not exited after ``grace`` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def wait_until_answers(proc: subprocess.Popen, url: str, timeout: float, what: str, tail: Callable[[], str]) -> None:
    """Poll ``url`` until it answers; raise with the log tail if ``proc`` exits or time runs out."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{tail()}")
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            time.sleep(0.2)
    stop_process(proc)
    raise RuntimeError(f"{what} did not answer {url} within {timeout} s:\n{tail()}")


__all__ = ["free_port", "stop_process", "wait_until_answers"]
