"""The ``mm-nerf`` viewer page in a real browser: headless Chromium picks a style in the page's own dropdown.

A short CPU run learns two styles that differ clearly in colour (a red and a blue image); nerfstudio's viewer serves
its checkpoint as ``ns-viewer`` does, and the system's Chromium loads the page, renders its WebGL canvas on
SwiftShader and is driven over the DevTools protocol like a user: a click on the Style input of the Styles panel, a
click on an option of its list. The canvas must then show that style: the render area changes, is nearer to the
pipeline's own render of the picked style from the viewer's camera than to the other style's, and picking the first
style again brings its picture back.

A ``head-stylize`` pipeline with tiny diffusion components, built untrained, is served the same way: Chromium clicks
the Prompt text field, replaces its text and the model's ``config.prompt`` (the next training step's prompt) becomes
the typed text.

The tier runs where a Chromium is installed (``apt-get install chromium``) and skips with :data:`NO_CHROMIUM`
elsewhere.
"""

from __future__ import annotations

import json
import random
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from browser import NO_CHROMIUM, Browser, find_chromium, wait_for
from conftest import short_run_config
from PIL import Image
from torch import Tensor

from mmstyle_ns.models.mm_nerf import ORIGINAL, STYLE_PANEL

pytest_plugins = ["pytester"]

COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220)}
"""The run's styles: one flat image each, so that their renders differ in colour."""

ITERATIONS = 40
"""Training steps (reconstruction, then stylization; see ``short_run_config``)."""

MAX_RES = 64
"""The viewer's render resolution (longer side): the canvas is compared at this size."""

SETTLE_SECONDS = 45.0
"""How long the canvas may take to show a picked style."""

FRAME_SECONDS = 0.5
"""Time given a finished render to reach the canvas, and the canvas to show that it stopped changing."""


def require_chromium() -> str:
    """The browser the tier runs; skips the test with :data:`NO_CHROMIUM` where none is installed."""
    executable = find_chromium()
    if executable is None:
        pytest.skip(NO_CHROMIUM)
    return executable


@pytest.fixture(scope="module")
def chromium() -> str:
    """The system's Chromium (the test skips without one)."""
    return require_chromium()


def test_browser_tests_skip_with_the_reason_where_no_chromium_is_installed(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))  # no browser to find
    pytester.makepyfile(
        """
        import pytest
        from test_viewer_browser import chromium  # the tier's fixture

        @pytest.mark.browser
        def test_needs_a_browser(chromium):
            raise AssertionError("ran without a browser")
        """
    )
    pytester.makeini("[pytest]\nmarkers =\n    browser: drives the viewer page in headless Chromium\n")
    reports = pytester.inline_run("-p", "no:cacheprovider")
    reports.assertoutcome(skipped=1)
    [skipped] = [r for r in reports.getreports("pytest_runtest_logreport") if r.skipped]
    assert isinstance(skipped.longrepr, tuple) and skipped.longrepr[2] == f"Skipped: {NO_CHROMIUM}"


# ---- the served run --------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Render:
    """One finished viewer render."""

    style: str
    """The Style value it was made with."""
    images: dict[str, np.ndarray]
    """Its RGB outputs (``rgb`` and one per style) as ``[H, W, 3]`` floats."""
    finished: float
    """``time.monotonic()`` when it finished."""


@dataclass
class Served:
    """A trained ``mm-nerf`` run in nerfstudio's viewer, with the renders the viewer made of it."""

    viewer: Any
    """nerfstudio's ``Viewer``."""
    url: str
    styles: list[str]
    """The run's style names, in the Style dropdown's order (``original`` follows them)."""
    renders: list[Render] = field(default_factory=list)
    """Every finished viewer render, oldest first."""
    busy: int = 0
    """Renders in progress."""
    lock: threading.Lock = field(default_factory=threading.Lock)
    """Guards :attr:`renders` and :attr:`busy` (the viewer renders on its own thread)."""


@pytest.fixture(scope="module")
def served(chromium: str, tiny_scene: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """Trains the two-colour run, then serves its checkpoint with the viewer (rendering at :data:`MAX_RES`)."""
    from nerfstudio.utils.eval_utils import eval_setup

    from mmstyle_ns.pipelines.mm_nerf import MMNeRFPipeline

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the browser needs the other core
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    root = tmp_path_factory.mktemp("browser")
    specs = []
    for name, colour in COLOURS.items():
        Image.fromarray(np.full((64, 64, 3), colour, np.uint8)).save(root / f"{name}.png")
        specs.append(f"{name}=image:{root / name}.png")
    config = short_run_config("mm-nerf", tiny_scene, root, iterations=ITERATIONS)
    config.pipeline.styles = tuple(specs)
    config.pipeline.stylized_views = 4
    config.save_config()
    trainer = config.setup(local_rank=0, world_size=1)
    trainer.setup()
    trainer.train()
    del trainer  # only its checkpoint is served

    # what ns-viewer does with the run's config: load the checkpoint, serve it
    config, pipeline, _, _ = eval_setup(config.get_base_dir() / "config.yml", test_mode="test")
    assert isinstance(pipeline, MMNeRFPipeline)
    model = pipeline.mm_model
    render = model.get_outputs_for_camera
    served: Served | None = None

    def recording(camera: Any, obb_box: Any = None) -> dict[str, Tensor]:
        assert served is not None
        chosen = model.style_controls.style.value
        with served.lock:
            served.busy += 1
        try:
            outputs = render(camera, obb_box=obb_box)  # the viewer interrupts it when the camera moves
            images = {k: v.clamp(0, 1).cpu().numpy() for k, v in outputs.items() if v.shape[-1] == 3}
            with served.lock:
                served.renders.append(Render(chosen, images, time.monotonic()))
        finally:
            with served.lock:
                served.busy -= 1
        return outputs

    model.get_outputs_for_camera = recording  # type: ignore[method-assign]
    try:
        with _viewer(config.viewer, pipeline, tiny_scene, root) as (viewer, url):
            served = Served(viewer, url, model.style_names)
            yield served
    finally:
        torch.set_num_threads(threads)


@contextmanager
def _viewer(viewer_config: Any, pipeline: Any, data: Path, root: Path) -> Iterator[tuple[Any, str]]:
    """Serves ``pipeline`` with nerfstudio's ``Viewer`` on a free local port as ``ns-viewer`` does (its training
    state "completed", lossless frames at :data:`MAX_RES`); yields the viewer and its page's address and stops
    both the server and its render threads afterwards."""
    from nerfstudio.viewer.viewer import Viewer

    viewer_config.websocket_host, viewer_config.websocket_port = "127.0.0.1", _free_port()
    viewer_config.image_format = "png"  # lossless frames
    viewer = Viewer(viewer_config, log_filename=root / "viewer_log.txt", datapath=data, pipeline=pipeline)
    try:
        viewer.init_scene(
            train_dataset=pipeline.datamanager.train_dataset,
            train_state="completed",
            eval_dataset=pipeline.datamanager.eval_dataset,
        )
        viewer.control_panel._max_res.value = MAX_RES
        yield viewer, f"http://127.0.0.1:{viewer_config.websocket_port}/"
    finally:
        viewer.viser_server.stop()
        for machine in list(viewer.render_statemachines.values()):
            machine.running = False


# ---- the page ----------------------------------------------------------------------------------------------

_INPUT_JS = """((panel, label) => {
  const header = [...document.querySelectorAll('.mantine-Paper-root')].find(e => e.textContent.trim() === panel);
  if (!header) return null;
  const labels = [...header.parentElement.querySelectorAll('label')];
  const found = labels.find(l => l.textContent.trim() === label);
  const input = found && document.getElementById(found.htmlFor);
  if (!input) return null;
  input.scrollIntoView({block: 'center'});
  const box = input.getBoundingClientRect();
  return {id: input.id, value: input.value, x: box.x + box.width / 2, y: box.y + box.height / 2,
          labels: labels.map(l => l.textContent.trim())};
})(%s, %s)"""
"""A labelled input of a viewer panel, scrolled into view: its id, value, centre and the panel's labels (or null)."""

_OPTION_JS = """((input, value) => {
  const list = document.querySelector(`[role="listbox"][aria-labelledby="${input}-label"]`);
  const options = list ? [...list.querySelectorAll('[role="option"]')] : [];
  const option = options.find(o => o.textContent.trim() === value);
  const box = option && option.getBoundingClientRect();
  if (!box || box.width === 0 || box.height === 0) return null;
  return {x: box.x + box.width / 2, y: box.y + box.height / 2, options: options.map(o => o.textContent.trim())};
})(%s, %s)"""
"""An option of a Select's open list (the list stays in the page, hidden, while closed), or null."""

_CANVAS_JS = """(() => {
  const box = document.querySelector('canvas[data-engine^="three.js"]').getBoundingClientRect();
  return [box.x, box.y, box.width, box.height];
})()"""
"""The viewer's 3D canvas (the render is drawn into it) in page coordinates."""


def _panel_input(browser: Browser, label: str) -> dict[str, Any]:
    """The input ``label`` of the Styles panel (see ``_INPUT_JS``), once the page shows it."""
    script = _INPUT_JS % (json.dumps(STYLE_PANEL), json.dumps(label))
    return wait_for(lambda: browser.evaluate(script), 30, f"the '{label}' input of the '{STYLE_PANEL}' panel")


def _pick(browser: Browser, label: str, value: str) -> list[str]:
    """Picks ``value`` in the dropdown ``label`` of the Styles panel as a user does; returns the options listed."""
    control = _panel_input(browser, label)
    browser.click(control["x"], control["y"])
    option = wait_for(
        lambda: browser.evaluate(_OPTION_JS % (json.dumps(control["id"]), json.dumps(value))),
        10,
        f"option '{value}' in the open '{label}' list",
    )
    browser.click(option["x"], option["y"])
    wait_for(lambda: _panel_input(browser, label)["value"] == value, 10, f"'{label}' to show '{value}'")
    return option["options"]


@dataclass
class Shown:
    """The canvas once it settled on a style, beside the viewer's render it shows."""

    canvas: np.ndarray
    """The render area, ``[h, w, 3]`` floats, resized to the render's size."""
    images: dict[str, np.ndarray]
    """The viewer's render the canvas shows: its RGB outputs, every style's image among them."""
    screenshot: np.ndarray
    """The render area at the page's resolution, uint8."""


def _settled(browser: Browser, served: Served, style: str, after: int) -> Shown:
    """Waits until the viewer's newest render (past its ``after``-th) is a full-resolution one with ``style`` picked,
    no other is under way and the canvas stopped changing; returns the canvas then."""

    def shown() -> Shown | None:
        with served.lock:
            count, busy = len(served.renders), served.busy
            last = served.renders[-1] if count > after else None
        if busy or last is None or last.style != style or max(last.images["rgb"].shape[:2]) != MAX_RES:
            return None
        if time.monotonic() - last.finished < FRAME_SECONDS:  # the frame is still on its way to the canvas
            return None
        clip = tuple(browser.evaluate(_CANVAS_JS))  # the page's layout may still change (a scrollbar appears)
        first = browser.screenshot(clip)  # type: ignore[arg-type]
        time.sleep(FRAME_SECONDS)
        second = browser.screenshot(clip)  # type: ignore[arg-type]
        with served.lock:
            if len(served.renders) != count or served.busy or tuple(browser.evaluate(_CANVAS_JS)) != clip:
                return None
        if np.abs(first.astype(int) - second.astype(int)).max() > 2:
            return None
        height, width = last.images["rgb"].shape[:2]
        small = Image.fromarray(second).resize((width, height), Image.Resampling.BOX)
        return Shown(np.asarray(small, np.float32) / 255, last.images, second)

    return wait_for(shown, SETTLE_SECONDS, f"the canvas to settle on the viewer's render of '{style}'")


def _error(canvas: np.ndarray, image: np.ndarray) -> float:
    return float(np.abs(canvas - image).mean())


def _blueness(seen: Shown) -> float:
    """Mean blue minus red of the canvas where the render shows the object (not the white background)."""
    solid = seen.images["rgb"].min(axis=-1) < 0.9
    return float((seen.canvas[..., 2] - seen.canvas[..., 0])[solid].mean())


@pytest.mark.browser
def test_picking_a_style_in_the_page_changes_the_canvas_to_that_style(
    served: Served, chromium: str, tmp_path: Path
) -> None:
    import viser.transforms as vtf
    from nerfstudio.viewer.viewer import VISER_NERFSTUDIO_SCALE_RATIO

    first, second = served.styles
    with Browser(chromium) as browser:
        browser.goto(served.url)
        style = _panel_input(browser, "Style")
        assert {"Style", "Blend with", "Blend"} <= set(style["labels"]), "the Styles panel lacks the style controls"
        assert style["value"] == first
        wait_for(lambda: "Connected" in browser.evaluate("document.body.innerText"), 10, "the page to connect")

        # look at the object from an eval view, without the training cameras' frustums in front of it
        clients = wait_for(lambda: served.viewer.viser_server.get_clients() or None, 10, "the page's client")
        client = next(iter(clients.values()))
        camera = served.viewer.pipeline.datamanager.eval_dataset.cameras[0]
        c2w = camera.camera_to_worlds.numpy()
        client.camera.position = c2w[:3, 3] * VISER_NERFSTUDIO_SCALE_RATIO
        client.camera.wxyz = (vtf.SO3.from_matrix(c2w[:3, :3]) @ vtf.SO3.from_x_radians(np.pi)).wxyz  # OpenCV
        client.camera.fov = float(2 * np.arctan(float(camera.height) / 2 / float(camera.fy)))
        served.viewer.set_camera_visibility(False)

        controls = served.viewer.pipeline.mm_model.style_controls
        shown: list[Shown] = []
        for step, name in enumerate((first, second, first)):
            count = len(served.renders)
            if step:
                assert _pick(browser, "Style", name) == [*served.styles, ORIGINAL]
                wait_for(lambda n=name: controls.style.value == n, 10, f"the viewer to receive the pick of '{name}'")
            shown.append(_settled(browser, served, name, after=count))
            Image.fromarray(shown[-1].screenshot).save(tmp_path / f"{step}-{name}.png")

    before, picked, back = shown
    where = f"(canvas screenshots in {tmp_path})"
    assert before.canvas.shape == picked.canvas.shape == back.canvas.shape, f"the canvas changed its size {where}"
    for name, other, seen in ((first, second, before), (second, first, picked), (first, second, back)):
        mine, theirs = _error(seen.canvas, seen.images[name]), _error(seen.canvas, seen.images[other])
        assert mine < 0.5 * theirs, f"with '{name}' picked the canvas does not show that style's render {where}"
    changed = _error(before.canvas, picked.canvas)
    assert changed > 0.01, f"the canvas hardly changed when '{second}' was picked {where}"
    assert _error(before.canvas, back.canvas) < 0.25 * changed, f"picking '{first}' again did not bring it back {where}"
    # the run's styles are a red and a blue image: the object is redder with the first, bluer with the second
    assert _blueness(picked) > _blueness(before) + 0.05 and _blueness(picked) > _blueness(back) + 0.05, where


# ---- the head-stylize prompt ---------------------------------------------------------------------------------

NEW_PROMPT = "a cartoon of a red cube on a plain floor"
"""What the test types into the Prompt field."""


@pytest.fixture
def head_viewer(
    chromium: str, one_thread: None, tiny_scene: Path, tiny_guidance_model: Path, tmp_path: Path
) -> Iterator[tuple[Any, str]]:
    """An untrained ``head-stylize`` pipeline (tiny diffusion components, one coarse grid, nothing encoded)
    served by the viewer; yields its model and the page's address (skips first where no Chromium is installed)."""
    from mmstyle_ns.models.head_stylize import HeadStylizeModel

    config = short_run_config("head-stylize", tiny_scene, tmp_path, iterations=4, guidance_model=tiny_guidance_model)
    model_config = config.pipeline.model
    model_config.grid_resolutions, model_config.regrid_steps, model_config.init_from_views = (16,), (), False
    pipeline = config.pipeline.setup(device="cpu", test_mode="inference")  # "inference": no latents encoded
    assert isinstance(pipeline.model, HeadStylizeModel)
    with _viewer(config.viewer, pipeline, tiny_scene, tmp_path) as (_, url):
        yield pipeline.model, url


_TEXT_JS = """(label => {
  const labels = [...document.querySelectorAll('label')].filter(l => l.textContent.trim() === label);
  if (labels.length !== 1) return null;
  let row = labels[0].parentElement;  // the label's row holds the input (viser does not give the input the
  while (row && !row.querySelector('input')) row = row.parentElement;  // label's htmlFor id)
  const input = row && row.querySelector('input');
  if (!input) return null;
  input.scrollIntoView({block: 'center'});
  const box = input.getBoundingClientRect();
  return {type: input.type, value: input.value, focused: document.activeElement === input,
          x: box.x + box.width / 2, y: box.y + box.height / 2};
})(%s)"""
"""The page's one text input labelled ``label``, scrolled into view: its type, value, whether it has the focus, and
its centre (or null)."""


def _text_input(browser: Browser, label: str) -> dict[str, Any]:
    """The text input ``label`` (see ``_TEXT_JS``), once the page shows it."""
    return wait_for(lambda: browser.evaluate(_TEXT_JS % json.dumps(label)), 30, f"the '{label}' text input")


@pytest.mark.browser
def test_typing_a_prompt_in_the_page_sets_the_head_stylize_prompt(head_viewer: tuple[Any, str], chromium: str) -> None:
    model, url = head_viewer
    before = model.config.prompt
    assert before and before != NEW_PROMPT
    with Browser(chromium) as browser:
        browser.goto(url)
        wait_for(lambda: "Connected" in browser.evaluate("document.body.innerText"), 10, "the page to connect")
        prompt = _text_input(browser, "Prompt")
        assert prompt["type"] == "text" and prompt["value"] == before, "the Prompt field does not show the prompt"

        browser.click(prompt["x"], prompt["y"])
        wait_for(lambda: _text_input(browser, "Prompt")["focused"], 10, "the Prompt field to take the focus")
        browser.select_all()
        browser.insert_text(NEW_PROMPT)  # replaces the selected text
        browser.press_key("Enter")
        wait_for(lambda: model.config.prompt == NEW_PROMPT, 10, "the model's prompt to become the typed text")
        assert _text_input(browser, "Prompt")["value"] == NEW_PROMPT
    assert model.viewer_prompt.value == NEW_PROMPT
