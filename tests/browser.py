"""Headless Chromium driven over the Chrome DevTools protocol (CDP), for tests that load the viewer's page.

The browser is the system's own (Debian's ``chromium`` package); nothing here downloads one. WebGL runs on
SwiftShader, Chromium's CPU renderer, so the page draws its canvas on machines without a GPU. The client speaks
CDP's JSON messages over the page target's websocket: evaluate JavaScript, dispatch mouse and keyboard events as a
user's mouse and keyboard do (text goes in as typed or pasted into the focused element), capture screenshots.

Example::

    with Browser() as browser:
        browser.goto("http://127.0.0.1:7007/")
        title = browser.evaluate("document.title")
        pixels = browser.screenshot((0, 0, 400, 300))  # [300, 400, 3] uint8

"""

from __future__ import annotations

import base64
import io
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image
from websockets.sync.client import ClientConnection, connect

CHROMIUM_NAMES = ("chromium", "chromium-browser")
"""Executables looked up on ``PATH``, in order (Debian and Ubuntu name the browser differently)."""

NO_CHROMIUM = (
    "needs a Chromium browser: none of " + ", ".join(CHROMIUM_NAMES) + " is on PATH (apt-get install chromium)"
)
"""Skip reason of the browser tests where no Chromium is found."""

WINDOW = (1200, 800)
"""Default viewport size (width, height) in CSS pixels."""

CTRL = 2
"""CDP's modifier bit of the Control key (Alt 1, Control 2, Meta 4, Shift 8), for :meth:`Browser.press_key`."""

KEYS: dict[str, tuple[str, int, str]] = {
    "Enter": ("Enter", 13, "\r"),
    "Tab": ("Tab", 9, ""),
    "Escape": ("Escape", 27, ""),
    "Backspace": ("Backspace", 8, ""),
    "Delete": ("Delete", 46, ""),
}
"""Named keys :meth:`Browser.press_key` knows: their ``code``, Windows virtual key code and the text they type."""

T = TypeVar("T")


def find_chromium() -> str | None:
    """The path of the first of :data:`CHROMIUM_NAMES` found on ``PATH``, or ``None``."""
    for name in CHROMIUM_NAMES:
        if path := shutil.which(name):
            return path
    return None


class BrowserError(RuntimeError):
    """The browser did not start, a CDP command failed, or the page did not reach an expected state in time."""


def wait_for(check: Callable[[], T | None], seconds: float, what: str, interval: float = 0.2) -> T:
    """Calls ``check`` until it returns something other than ``None`` (or ``False``) and returns that.

    Raises:
        BrowserError: naming ``what`` when ``seconds`` pass first.
    """
    end = time.monotonic() + seconds
    while True:
        result = check()
        if result is not None and result is not False:
            return result
        if time.monotonic() > end:
            raise BrowserError(f"timed out after {seconds:.0f} s waiting for {what}")
        time.sleep(interval)


class Browser:
    """A headless Chromium with one page, controlled over CDP. Use it as a context manager.

    Args:
        executable: The browser to run; default :func:`find_chromium`.
        window: Viewport size (width, height) in CSS pixels, one device pixel each.
    """

    def __init__(self, executable: str | None = None, window: tuple[int, int] = WINDOW) -> None:
        executable = executable or find_chromium()
        if executable is None:
            raise BrowserError(NO_CHROMIUM)
        self._profile = tempfile.TemporaryDirectory(prefix="chromium-", ignore_cleanup_errors=True)
        self._log = open(Path(self._profile.name) / "browser.log", "w+b")  # closed in close()
        arguments = [
            executable,
            "--headless=new",
            "--no-sandbox",  # as root, and in containers without user namespaces
            "--use-gl=swiftshader",
            "--enable-unsafe-swiftshader",  # WebGL on SwiftShader without a GPU
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--remote-debugging-port=0",  # the browser picks a free port and writes it to DevToolsActivePort
            f"--user-data-dir={self._profile.name}",
            f"--window-size={window[0]},{window[1]}",
            "about:blank",
        ]
        # its own process group: the browser's helper processes (renderer, GPU, ...) end with it
        self._process = subprocess.Popen(arguments, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        self._ids = itertools.count(1)
        self._connection: ClientConnection | None = None
        self.events: list[dict[str, Any]] = []
        """CDP events (of the domains enabled, such as ``Page``) that arrived while waiting for command results."""
        try:
            self._connection = connect(self._page_websocket(), max_size=None, open_timeout=10)
            # the viewport exactly the window (headless windows lose some height to absent browser chrome)
            width, height = window
            self.send(
                "Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False
            )
        except BaseException:
            self.close()
            raise

    def _page_websocket(self) -> str:
        active = Path(self._profile.name) / "DevToolsActivePort"

        def port() -> int | None:
            if self._process.poll() is not None:
                raise BrowserError(f"the browser exited with code {self._process.returncode}:\n{self.log()}")
            lines = active.read_text().splitlines() if active.exists() else []
            return int(lines[0]) if len(lines) >= 2 else None  # complete: the port, then the browser's path

        debug_port = wait_for(port, 30, "the browser's DevTools port")

        def page() -> str | None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{debug_port}/json/list", timeout=5) as response:
                    targets = json.load(response)
            except OSError:  # not listening yet
                return None
            return next((t["webSocketDebuggerUrl"] for t in targets if t.get("type") == "page"), None)

        return wait_for(page, 10, "the browser's page target")

    def log(self) -> str:
        """What the browser process printed so far."""
        self._log.flush()
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Closes the connection, ends the browser and its helper processes and removes its profile."""
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        group = self._process.pid  # the group's id is its leader's
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if not self._signal_group(group, sig):
                break
            end = time.monotonic() + 10
            while self._signal_group(group, 0) and time.monotonic() < end:  # signal 0: is anyone left?
                self._process.poll()  # reaps the leader
                time.sleep(0.05)
        self._process.wait()
        self._log.close()
        self._profile.cleanup()

    @staticmethod
    def _signal_group(group: int, sig: int) -> bool:
        """Sends ``sig`` to the process group; ``False`` when none of its processes is left."""
        try:
            os.killpg(group, sig)
        except ProcessLookupError:
            return False
        return True

    # ---- CDP ------------------------------------------------------------------------------------------------

    def send(self, method: str, timeout: float = 30.0, **params: Any) -> dict[str, Any]:
        """Sends one CDP command to the page and returns its result; events that arrive first go to :attr:`events`.

        Raises:
            BrowserError: the command failed or no answer came within ``timeout`` seconds.
        """
        if self._connection is None:
            raise BrowserError("the browser is closed")
        message_id = next(self._ids)
        self._connection.send(json.dumps({"id": message_id, "method": method, "params": params}))
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            try:
                message = json.loads(self._connection.recv(timeout=left))
            except TimeoutError:
                break
            if message.get("id") != message_id:
                self.events.append(message)
                continue
            if "error" in message:
                raise BrowserError(f"{method} failed: {message['error']}")
            return message.get("result", {})
        raise BrowserError(f"no answer to {method} within {timeout:.0f} s")

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited, the result JSON-serialised).

        Raises:
            BrowserError: the expression threw.
        """
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise BrowserError(f"{expression!r} threw: {details.get('exception', {}).get('description', details)}")
        return result["result"].get("value")

    def goto(self, url: str, seconds: float = 30.0) -> None:
        """Loads ``url`` and waits until its document has loaded."""
        self.send("Page.enable")
        self.send("Page.navigate", url=url)
        wait_for(lambda: self.evaluate("document.readyState") == "complete", seconds, f"{url} to load")

    def click(self, x: float, y: float) -> None:
        """A left click at page coordinates ``(x, y)``, as a mouse does it: move, press, release."""
        self.send("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        for kind, buttons in (("mousePressed", 1), ("mouseReleased", 0)):
            self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", buttons=buttons, clickCount=1)

    def press_key(self, key: str, modifiers: int = 0, commands: Sequence[str] = ()) -> None:
        """Presses and releases ``key`` on the focused element, as a keyboard does.

        Args:
            key: A name of :data:`KEYS` or one letter or digit.
            modifiers: Modifier keys held meanwhile (a sum of CDP's bits, such as :data:`CTRL`).
            commands: Editing commands the key press performs (e.g. ``selectAll``): Chromium runs a shortcut's
                command only when it is named here.

        Raises:
            BrowserError: ``key`` is neither a named key nor one letter or digit.
        """
        if key in KEYS:
            code, key_code, text = KEYS[key]
        elif len(key) == 1 and key.isascii() and key.isalnum():
            code = f"Key{key.upper()}" if key.isalpha() else f"Digit{key}"
            key_code, text = ord(key.upper()), key
        else:
            raise BrowserError(f"unknown key {key!r}: one of {', '.join(KEYS)} or one letter or digit")
        if modifiers & ~8:  # a shortcut (Shift alone still types)
            text = ""
        event: dict[str, Any] = {"key": key, "code": code, "windowsVirtualKeyCode": key_code, "modifiers": modifiers}
        down = {**event, "type": "keyDown", "text": text} if text else {**event, "type": "rawKeyDown"}
        self.send("Input.dispatchKeyEvent", **down, commands=list(commands))
        self.send("Input.dispatchKeyEvent", **event, type="keyUp")

    def select_all(self) -> None:
        """Control+A: selects all the text of the focused input."""
        self.press_key("a", modifiers=CTRL, commands=("selectAll",))

    def insert_text(self, text: str) -> None:
        """Types ``text`` into the focused element in one go, as a paste or an input method does: one ``input``
        event, no key events (it replaces the element's selection)."""
        self.send("Input.insertText", text=text)

    def screenshot(self, clip: tuple[float, float, float, float] | None = None) -> np.ndarray:
        """The page's pixels as an ``[H, W, 3]`` uint8 array, of the whole viewport or of ``clip`` = (x, y, w, h)."""
        params: dict[str, Any] = {"format": "png"}
        if clip is not None:
            x, y, width, height = clip
            params["clip"] = {"x": x, "y": y, "width": width, "height": height, "scale": 1}
        data = base64.b64decode(self.send("Page.captureScreenshot", **params)["data"])
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
