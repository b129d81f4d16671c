"""Headless Debian Chromium driven over the Chrome DevTools Protocol (tests only).

Only ``websocket-client`` is needed (no chromedriver, no browser download): the browser is the
system ``chromium``, started on a free loopback debugging port with a throw-away profile.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from itertools import count
from pathlib import Path
from typing import Any

import pytest

from server import stop_process

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1400,900")


def require_chromium() -> None:
    """Skip without Chromium, except in CI (``CI`` set), where that is a failure."""
    if not os.path.exists(CHROMIUM):
        msg = "chromium not installed: apt-get install chromium"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


class Browser:
    """One headless Chromium page. ``js(expr)`` evaluates in the page, ``click(x, y)`` clicks."""

    def __init__(self, log: Path, port: int) -> None:
        import websocket

        self.profile = tempfile.mkdtemp(prefix="chromium-")
        self._fh = open(log, "w")
        self.proc = subprocess.Popen(
            [CHROMIUM, *FLAGS, f"--user-data-dir={self.profile}", f"--remote-debugging-port={port}", "about:blank"],
            stdout=self._fh, stderr=subprocess.STDOUT,
        )
        deadline = time.time() + 60
        page = None
        while time.time() < deadline and page is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as r:
                    page = next((t for t in json.loads(r.read()) if t.get("type") == "page"), None)
            except OSError:
                time.sleep(0.3)
        if page is None:
            self.close()
            raise RuntimeError("chromium did not open its debugging port")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=120, suppress_origin=True)
        self._ids = count(1)
        self.console: list[str] = []
        self.send("Page.enable")
        self.send("Runtime.enable")

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        msg_id = next(self._ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("method") == "Runtime.consoleAPICalled":
                args = msg["params"].get("args", [])
                self.console.append(" ".join(str(a.get("value", a.get("description", ""))) for a in args)[:300])
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def goto(self, url: str) -> None:
        self.send("Page.navigate", url=url)

    def js(self, expression: str) -> Any:
        res = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"page script failed: {res['exceptionDetails'].get('text')}: {expression[:200]}")
        return res.get("result", {}).get("value")

    def text(self) -> str:
        return self.js("document.body ? document.body.innerText : ''") or ""

    def wait_for(self, expression: str, timeout: float = 60, what: str = "") -> Any:
        """Poll ``expression`` until truthy; fail with the page text when it never is."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.5)
        raise AssertionError(f"timed out waiting for {what or expression}; page text:\n{self.text()[:3000]}")

    def click(self, x: float, y: float) -> None:
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def click_text(self, text: str, selector: str = "*", timeout: float = 60) -> None:
        """Click the centre of the smallest visible element whose text is ``text``."""
        find = f"""(() => {{
            const els = [...document.querySelectorAll({json.dumps(selector)})].filter(e =>
                e.offsetParent !== null && (e.innerText || '').trim() === {json.dumps(text)});
            if (!els.length) return null;
            els.sort((a, b) => a.innerText.length - b.innerText.length || b.querySelectorAll('*').length - a.querySelectorAll('*').length);
            const r = els[els.length - 1].getBoundingClientRect();
            return [r.x + r.width / 2, r.y + r.height / 2];
        }})()"""
        x, y = self.wait_for(find, timeout, what=f"an element reading {text!r}")
        self.click(x, y)

    def click_selector(self, selector: str, timeout: float = 60) -> None:
        """Click the centre of the first visible element matching the CSS ``selector``."""
        self.click_element(f"[...document.querySelectorAll({json.dumps(selector)})].find(e => e.offsetParent !== null)",
                           timeout, selector)

    def click_element(self, element_js: str, timeout: float = 60, what: str = "") -> None:
        """Click the centre of the element that the JavaScript expression ``element_js`` yields."""
        find = f"""(() => {{
            const e = {element_js};
            if (!e) return null;
            e.scrollIntoView({{block: 'center'}});
            const r = e.getBoundingClientRect();
            return [r.x + r.width / 2, r.y + r.height / 2];
        }})()"""
        x, y = self.wait_for(find, timeout, what=what or element_js)
        self.click(x, y)

    def screenshot(self, path: Path) -> Path:
        data = self.send("Page.captureScreenshot", format="png")["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            self.ws.close()
        except Exception:
            pass
        stop_process(self.proc)
        self._fh.close()
        shutil.rmtree(self.profile, ignore_errors=True)
