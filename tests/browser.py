"""A page in headless Chromium driven as a reader drives it: the DevTools protocol over a pipe (no extra package,
no port), with a window size, real clicks and key presses, script values read back and screenshots.

Every wait has a deadline: a browser that hangs fails the test, it never blocks the suite.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

#: Seconds any one answer from the browser may take.
DEADLINE_S = 60.0


def chromium() -> str:
    """The browser's own program: Debian's /usr/bin/chromium is a shell script whose start-up scripts may use
    file descriptors 3 and 4 (the protocol's pipe)."""
    real = Path("/usr/lib/chromium/chromium")
    if real.exists():
        return str(real)
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no Chromium on this machine (.ci/run installs Debian's chromium package)")
    return browser


class Page:
    """One tab of a headless Chromium started for the test; use as a context manager."""

    def __init__(self, profile: Path, width: int = 1280, height: int = 900) -> None:
        self.profile, self.width, self.height = profile, width, height
        self._id = 0
        self._buffer = b""
        self._events: list[dict[str, Any]] = []

    def __enter__(self) -> Page:
        to_browser, self._write = os.pipe()
        self._read, from_browser = os.pipe()
        # The protocol pipe is the browser's fd 3 (commands in) and fd 4 (answers out). The browser's ends are
        # moved above 9 first, so that placing one at 3 or 4 cannot overwrite the other.
        ends = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (to_browser, from_browser)]
        os.close(to_browser)
        os.close(from_browser)

        def place() -> None:  # in the child, before exec: dup2's copies are inherited, the rest closes at exec
            os.dup2(ends[0], 3)
            os.dup2(ends[1], 4)

        self._proc = subprocess.Popen(
            [
                chromium(),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--remote-debugging-pipe",
                f"--user-data-dir={self.profile}",
                f"--window-size={self.width},{self.height}",
                "about:blank",
            ],
            preexec_fn=place,
            close_fds=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for fd in ends:
            os.close(fd)
        try:
            targets = self._send("Target.getTargets")["targetInfos"]
            page = next(t for t in targets if t["type"] == "page")
            self._session = self._send("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]
            self.command("Page.enable")
            self.command("Runtime.enable")
            self.resize(self.width, self.height)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self._proc.kill()
        self._proc.wait(timeout=30)
        os.close(self._write)
        os.close(self._read)

    # The protocol: one JSON message per NUL-terminated chunk.
    def _send(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        self._id += 1
        message: dict[str, Any] = {"id": self._id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        while True:
            answer = self._next()
            if answer.get("id") == self._id:
                if "error" in answer:
                    raise AssertionError(f"{method}: {answer['error']}")
                result: dict[str, Any] = answer.get("result", {})
                return result
            self._events.append(answer)

    def _next(self) -> dict[str, Any]:
        deadline = time.monotonic() + DEADLINE_S
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self._read], [], [], max(left, 0))
            if not ready:
                raise AssertionError(f"Chromium gave no answer within {DEADLINE_S:.0f} s")
            chunk = os.read(self._read, 1 << 20)
            if not chunk:
                raise AssertionError("Chromium closed its protocol pipe")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\0", 1)
        message: dict[str, Any] = json.loads(line)
        return message

    def command(self, method: str, **params: Any) -> dict[str, Any]:
        return self._send(method, self._session, **params)

    def resize(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self.command(
            "Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=width < 600
        )

    def open(self, url: str) -> None:
        """Load ``url`` afresh and wait until the page's script has marked it ready (``data-ready`` on the body)."""
        self.command("Page.navigate", url="about:blank")  # a new hash alone would not load the page again
        self.command("Page.navigate", url=url)
        deadline = time.monotonic() + DEADLINE_S
        while self.value("document.readyState === 'complete' && document.body.getAttribute('data-ready')") != "1":
            if time.monotonic() > deadline:
                raise AssertionError(f"{url} did not get ready within {DEADLINE_S:.0f} s")
            time.sleep(0.05)

    def value(self, expression: str) -> Any:
        """What ``expression`` evaluates to in the page (JSON-like values)."""
        answer = self.command("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in answer:
            raise AssertionError(f"{expression}: {answer['exceptionDetails']}")
        return answer["result"].get("value")

    def box(self, selector: str) -> dict[str, float] | None:
        """The viewport rectangle of the first element ``selector`` finds (None when none)."""
        found: dict[str, float] | None = self.value(
            f"(function(){{var e=document.querySelector({json.dumps(selector)});if(!e){{return null;}}"
            "var r=e.getBoundingClientRect();return {left:r.left,top:r.top,right:r.right,bottom:r.bottom,"
            "width:r.width,height:r.height};})()"
        )
        return found

    def inside(self, selector: str) -> bool:
        """Whether the element is whole inside the viewport and has a size."""
        b = self.box(selector)
        return (
            b is not None
            and b["width"] > 0
            and b["height"] > 0
            and b["left"] >= 0
            and b["top"] >= 0
            and b["right"] <= self.width
            and b["bottom"] <= self.height
        )

    def click(self, selector: str) -> None:
        """A mouse click in the middle of the element (scrolled into view first), as a reader gives it."""
        self.value(f"document.querySelector({json.dumps(selector)}).scrollIntoView({{block: 'center'}})")
        b = self.box(selector)
        assert b is not None, f"nothing matches {selector}"
        x, y = b["left"] + b["width"] / 2, b["top"] + b["height"] / 2
        for kind in ("mousePressed", "mouseReleased"):
            self.command("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def key(self, name: str) -> None:
        """Press and release a key: "ArrowRight", "ArrowLeft", "Escape"."""
        codes = {"ArrowLeft": 37, "ArrowUp": 38, "ArrowRight": 39, "ArrowDown": 40, "Escape": 27}
        for kind in ("rawKeyDown", "keyUp"):
            self.command("Input.dispatchKeyEvent", type=kind, key=name, code=name, windowsVirtualKeyCode=codes[name])

    def screenshot(self, path: Path) -> Path:
        data = self.command("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path
