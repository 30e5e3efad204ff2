"""Shared test configuration: the GPU marker and small fixtures."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
torch.set_num_threads(min(2, torch.get_num_threads()))

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` are skipped where no CUDA device is present (the one place this is decided)."""
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for a module of tiny models (a second only adds synchronisation on a busy machine); use
    with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_scene(tmp_path_factory: pytest.TempPathFactory):
    """A small embedded 360° scene (24 views at 32x32)."""
    from mmstyle_ns.data.scene import generate_scene

    return generate_scene("object360", tmp_path_factory.mktemp("scene") / "object360", num_views=24, resolution=32)


@pytest.fixture(scope="session")
def tiny_collection(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small collection of toy scenes (4 scenes of 8 views at 32x32), the data of multi-view methods."""
    from mmstyle_ns.data.collection import generate_collection

    return generate_collection(
        tmp_path_factory.mktemp("collection") / "toy", num_scenes=4, num_views=8, resolution=32, supersample=1
    )


@pytest.fixture(scope="session")
def tiny_guidance_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random diffusion model in the Stable Diffusion layout, with SD's 8x VAE downsampling."""
    from mmstyle_ns.guidance.tiny import build_tiny_stable_diffusion

    return build_tiny_stable_diffusion(tmp_path_factory.mktemp("sd") / "tiny-sd", vae_channels=(8, 8, 8, 8), seed=0)


def short_run_config(
    method: str, data: Path, output: Path, iterations: int = 40, guidance_model: Path | None = None
) -> Any:
    """The registered ``method``'s trainer config, shrunk to a short CPU run on ``data`` that still reaches every
    stage (coarse-to-fine regrids, the stylization or guided stage) and saves a checkpoint at its end; guided
    methods get ``guidance_model`` and prompts."""
    from nerfstudio.plugins.registry import discover_methods

    methods, _ = discover_methods()
    config = copy.deepcopy(methods[method])
    pipeline: Any = config.pipeline
    pipeline.datamanager.data = data
    pipeline.datamanager.train_num_rays_per_batch = 256
    config.output_dir = output / "runs"
    config.timestamp = "test"
    config.vis = "tensorboard"
    config.max_num_iterations = iterations
    config.steps_per_save = iterations
    config.save_only_latest_checkpoint = True
    config.steps_per_eval_batch = config.steps_per_eval_image = config.steps_per_eval_all_images = 10**6
    config.machine.device_type = "cpu"
    model = pipeline.model
    if hasattr(model, "regrid_steps"):  # exercise the coarse-to-fine path in a short run
        model.regrid_steps = iterations * 3 // 8, iterations * 3 // 4
        model.occupancy_warmup_steps = iterations // 5
    if hasattr(model, "reconstruction_steps"):  # reach the stylization stage too
        model.reconstruction_steps = iterations * 5 // 8
        pipeline.cache_dir = output / "style_cache"
    if hasattr(pipeline.datamanager, "views_per_step"):  # a multi-view method: a few views of each scene
        pipeline.datamanager.views_per_step = pipeline.datamanager.novel_views_per_step = 2
        pipeline.datamanager.eval_every_scene = 4
        pipeline.cache_dir = output / "latent_cache"
    if hasattr(pipeline, "guidance"):
        if guidance_model is None:
            raise ValueError(f"{method} is guided: pass guidance_model (the tiny_guidance_model fixture)")
        pipeline.guidance.model_path = str(guidance_model)
        for name, prompt in (("source_prompt", "a red cube on grass"), ("target_prompt", "a blue cube on grass")):
            if hasattr(model, name):
                setattr(model, name, prompt)
        if getattr(model, "prompt", None) == "":  # a method that distils from one prompt (head-stylize)
            model.prompt = "a cartoon of a blue sphere on grass"
    return config


@pytest.fixture(scope="session")
def adain_weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Random AdaIN encoder and decoder weights saved like the released files (the VGG one goes on past relu4_1)."""
    from torch import nn

    from mmstyle_ns.style.adain import build_decoder, build_encoder

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("adain")
    encoder, decoder = build_encoder(), build_decoder()
    with torch.no_grad():  # He initialisation keeps the random stacks' activations alive through the ReLUs
        for conv in (m for m in [*encoder, *decoder] if isinstance(m, nn.Conv2d)):
            assert conv.bias is not None
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            nn.init.normal_(conv.bias, 0.0, 0.05)
        last = decoder[-1]
        assert isinstance(last, nn.Conv2d) and last.bias is not None
        last.weight.mul_(0.05)
        last.bias.fill_(0.5)  # pictures around mid-grey rather than clipped
    full_vgg = nn.Sequential(*encoder, nn.ReflectionPad2d(1), nn.Conv2d(512, 512, 3), nn.ReLU())  # relu4_2 onwards
    torch.save(full_vgg.state_dict(), folder / "vgg_normalised.pth")
    torch.save(decoder.state_dict(), folder / "decoder.pth")
    return folder / "vgg_normalised.pth", folder / "decoder.pth"


def ns_train_refusal(method: str, data: Path, output: Path, *flags: str) -> tuple[str, str]:
    """Runs the real ``ns-train`` console command on inputs it must refuse and checks how: exit status 2, exactly one
    "Cannot train" line, no traceback and no output folder. Returns that line and the whole output."""
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PYTHONWARNINGS="ignore", COLUMNS="200")
    command = [str(Path(sys.executable).parent / "ns-train"), method, "--data", str(data)]
    result = subprocess.run(
        [*command, "--output-dir", str(output), "--vis", "tensorboard", *flags],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    text = result.stdout + result.stderr
    assert result.returncode == 2, text
    errors = [line for line in text.splitlines() if "Cannot train" in line]
    assert len(errors) == 1, text
    assert "Traceback" not in text and "Error:" not in text, text
    assert not output.exists()
    return errors[0], text
