"""A real browser for the tests: headless Chromium (the system's chromium-headless-shell or
chromium), driven over the DevTools protocol on 127.0.0.1 with tornado's websocket client."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request

from tornado.ioloop import IOLoop
from tornado.websocket import websocket_connect

BINARIES = ("chromium-headless-shell", "chromium", "chromium-browser")


def binary() -> str | None:
    return next((b for b in map(shutil.which, BINARIES) if b), None)


class Browser:
    def __init__(self):
        self.profile = tempfile.TemporaryDirectory()
        self.proc = subprocess.Popen([binary(), "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-port=0",
                                      f"--user-data-dir={self.profile.name}", "about:blank"],
                                     stderr=subprocess.PIPE, text=True)
        port = None
        for line in self.proc.stderr:
            m = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line)
            if m:
                port = int(m.group(1))
                break
        if port is None:
            raise RuntimeError("chromium did not start its DevTools endpoint")
        page = next(t for t in json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list").read())
                    if t["type"] == "page")
        self.loop = IOLoop()
        self.ws = self.loop.run_sync(lambda: websocket_connect(page["webSocketDebuggerUrl"], max_message_size=1 << 26))
        self.next_id = 0

    def send(self, method: str, **params) -> dict:
        self.next_id += 1
        mid = self.next_id

        async def call():
            await self.ws.write_message(json.dumps({"id": mid, "method": method, "params": params}))
            while True:
                msg = json.loads(await self.ws.read_message())
                if msg.get("id") == mid:
                    return msg

        msg = self.loop.run_sync(call, timeout=60)
        if "error" in msg:
            raise RuntimeError(f"{method}: {msg['error']}")
        return msg["result"]

    def goto(self, url: str) -> None:
        self.send("Page.navigate", url=url)
        self.wait("document.readyState === 'complete' && !!document.querySelector('form')", 30)

    def eval(self, expression: str):
        r = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait(self, expression: str, timeout: float) -> None:
        end = time.monotonic() + timeout
        while not self.eval(expression):
            if time.monotonic() > end:
                raise TimeoutError(f"waited {timeout} s for {expression}")
            time.sleep(0.2)

    def drag(self, start: tuple[float, float], end: tuple[float, float], steps: int = 8) -> None:
        """A left-button drag from ``start`` to ``end`` (page pixels), as a person's mouse makes it."""
        mouse = lambda kind, xy, **kw: self.send("Input.dispatchMouseEvent", type=kind, x=xy[0], y=xy[1], **kw)
        mouse("mouseMoved", start)
        mouse("mousePressed", start, button="left", buttons=1, clickCount=1)
        for i in range(1, steps + 1):
            mouse("mouseMoved", tuple(a + (b - a) * i / steps for a, b in zip(start, end)), button="left", buttons=1)
        mouse("mouseReleased", end, button="left", buttons=0, clickCount=1)

    def screenshot(self, path) -> None:
        """The whole page as a PNG at ``path``."""
        import base64

        size = self.eval("[document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
        self.send("Emulation.setDeviceMetricsOverride", width=max(size[0], 1000), height=size[1], deviceScaleFactor=1,
                  mobile=False)
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"]))
        self.send("Emulation.clearDeviceMetricsOverride")

    def close(self) -> None:
        self.ws.close()
        self.loop.close()
        self.proc.terminate()
        self.proc.wait(10)
        self.profile.cleanup()
