"""Multi-device training (nerfstudio's ``--machine.num-devices 2``) with two CPU processes over gloo.

Each process is set up the way nerfstudio's launcher sets up its workers (a process group, a seed per rank so
the ray batches differ, then the trainer). The processes must end with identical models — which only holds if
gradients are averaged and new parameters start equal everywhere — and the run must reach every stage.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import short_run_config

WORLD = 2


def _free_url() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{sock.getsockname()[1]}"


def _average_worker(rank: int, url: str, out: Path) -> None:
    from mmstyle_ns.distributed import average_gradients

    dist.init_process_group("gloo", init_method=url, world_size=WORLD, rank=rank)
    try:
        both = torch.nn.Parameter(torch.zeros(3))
        both.grad = torch.full((3,), float(rank + 1))
        one = torch.nn.Parameter(torch.zeros(2, 2))
        one.grad = torch.arange(4.0).view(2, 2) if rank == 0 else None
        none = torch.nn.Parameter(torch.zeros(1))
        average_gradients([both, one, none, both])  # a repeated parameter is averaged once
        torch.save({"both": both.grad, "one": one.grad, "none": none.grad}, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _train_worker(rank: int, url: str, config: object, out: Path) -> None:
    dist.init_process_group("gloo", init_method=url, world_size=WORLD, rank=rank)
    try:
        torch.set_num_threads(1)
        seed = config.machine.seed + rank  # type: ignore[attr-defined]  # as nerfstudio's train_loop seeds
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        trainer = config.setup(local_rank=rank, world_size=WORLD)  # type: ignore[attr-defined]
        trainer.setup()
        pipeline = trainer.pipeline
        _, batch = pipeline.datamanager.next_train(0)
        trainer.train()
        state = {k: v for k, v in pipeline.model.state_dict().items() if torch.is_tensor(v)}
        first = batch["indices"] if "indices" in batch else torch.cat([torch.tensor([batch["scene"]]), batch["views"]])
        extra = {"first_batch": first, "style_ready": getattr(pipeline, "style_ready", None)}
        torch.save({"state": state, **extra}, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_average_gradients_over_two_processes(tmp_path: Path) -> None:
    mp.spawn(_average_worker, args=(_free_url(), tmp_path), nprocs=WORLD)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for result in results:
        torch.testing.assert_close(result["both"], torch.full((3,), 1.5))
        torch.testing.assert_close(result["one"], torch.arange(4.0).view(2, 2) / 2)  # absent on rank 1 = zero
        assert result["none"] is None  # no process had one: the optimizers skip it as on one device


def test_average_gradients_is_a_no_op_on_one_process() -> None:
    from mmstyle_ns.distributed import average_gradients, world_size

    param = torch.nn.Parameter(torch.zeros(2))
    param.grad = torch.tensor([1.0, 2.0])
    average_gradients([param])
    assert world_size() == 1
    torch.testing.assert_close(param.grad, torch.tensor([1.0, 2.0]))


@pytest.mark.parametrize("method", ["mmstyle-base", "mm-nerf"])
def test_two_process_training_keeps_processes_identical(method: str, tiny_scene: Path, tmp_path: Path) -> None:
    config = short_run_config(method, tiny_scene, tmp_path)
    config.machine.num_devices = WORLD
    config.save_config()
    mp.spawn(_train_worker, args=(_free_url(), config, tmp_path), nprocs=WORLD)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    assert not torch.equal(results[0]["first_batch"], results[1]["first_batch"]), "processes saw the same rays"
    states = [r["state"] for r in results]
    assert states[0].keys() == states[1].keys()
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), f"{key} differs between the processes"
    coarsest = config.pipeline.model.grid_resolutions[0]  # pyright: ignore[reportAttributeAccessIssue]
    assert int(states[0]["field.grid_dims"].max()) > coarsest, "no regrid happened"
    if method == "mm-nerf":
        assert all(r["style_ready"] for r in results), "the stylization stage was not reached"
    assert any((config.get_base_dir() / "nerfstudio_models").glob("step-*.ckpt")), "rank 0 saved no checkpoint"


def test_two_process_training_of_a_multi_scene_method(
    tiny_collection: Path, tiny_guidance_model: Path, tmp_path: Path
) -> None:
    """tunemv3d: each process draws its own scenes and views; both end with the same model."""
    config = short_run_config("tunemv3d", tiny_collection, tmp_path, iterations=10, guidance_model=tiny_guidance_model)
    config.machine.num_devices = WORLD
    config.save_config()
    mp.spawn(_train_worker, args=(_free_url(), config, tmp_path), nprocs=WORLD)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    assert not torch.equal(results[0]["first_batch"], results[1]["first_batch"]), "processes drew the same views"
    states = [r["state"] for r in results]
    assert states[0].keys() == states[1].keys()
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), f"{key} differs between the processes"
