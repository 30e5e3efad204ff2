"""A headless client of nerfstudio's viser viewer, speaking the protocol the browser speaks.

The browser client receives windows of msgpack-encoded messages over a websocket (GUI elements, scene nodes,
background frames) and sends messages back (its camera, GUI edits). This client does the same from Python so
that tests can drive the viewer as a user does: pick a value in a dropdown, move a slider, and look at the
frames streamed back. It does not run the browser's JavaScript or WebGL.
"""

from __future__ import annotations

import io
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import msgspec
import numpy as np
from PIL import Image
from viser import _messages
from websockets.sync.client import ClientConnection, connect


class ViewerClient:
    """Connects to a viser server on ``127.0.0.1:port`` and keeps the GUI elements it was sent, by label.

    Use it as a context manager: the connection closes when the block ends.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.connection: ClientConnection = connect(f"ws://127.0.0.1:{port}", max_size=None)
        self.gui: dict[str, dict[str, Any]] = {}
        """The last ``GuiAdd*`` message of every labelled GUI element (type, id, value, options, ...)."""

    def page(self) -> bytes:
        """The page a browser gets at the viewer's address."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/", timeout=10) as response:
            return response.read()

    def __enter__(self) -> ViewerClient:
        self.connection.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.connection.__exit__(*exc)  # type: ignore[arg-type]

    def _send(self, message: _messages.Message) -> None:
        self.connection.send(msgspec.msgpack.encode(message.as_serializable_dict()))

    def receive(self, seconds: float, until: Callable[[np.ndarray], bool] | None = None) -> np.ndarray | None:
        """Reads messages for up to ``seconds``; returns the first frame ``until`` accepts (``None`` if none did).

        Without ``until``, reads for the whole time and returns the last frame, if any.
        """
        end = time.monotonic() + seconds
        last = None
        while (left := end - time.monotonic()) > 0:
            try:
                raw = self.connection.recv(timeout=min(left, 1.0))
            except TimeoutError:
                continue
            if isinstance(raw, str):  # viser sends binary frames only
                continue
            window = msgspec.msgpack.decode(raw)
            for message in [window] if isinstance(window, dict) else window:
                kind = message["type"]
                if kind.startswith("GuiAdd") and "label" in message:
                    self.gui[message["label"]] = message
                elif kind == "BackgroundImageMessage":
                    last = np.asarray(Image.open(io.BytesIO(message["rgb_bytes"])).convert("RGB"))
                    if until is not None and until(last):
                        return last
        return None if until is not None else last

    def set_camera(self, wxyz: tuple[float, ...], position: tuple[float, ...], fov: float, aspect: float = 1.0) -> None:
        """Sends the client's camera (viser's OpenCV convention, viewer units); the first one registers the client."""
        self._send(
            _messages.ViewerCameraMessage(
                wxyz=tuple(float(x) for x in wxyz),  # type: ignore[arg-type]
                position=tuple(float(x) for x in position),  # type: ignore[arg-type]
                fov=float(fov),
                aspect=float(aspect),
                look_at=(0.0, 0.0, 0.0),
                up_direction=(0.0, 0.0, 1.0),
            )
        )

    def set_value(self, label: str, value: Any) -> None:
        """Edits a GUI element as a user would (the server runs its callbacks)."""
        self._send(_messages.GuiUpdateMessage(self.gui[label]["id"], {"value": value}))
