"""The ``gpu`` marker skips on machines without CUDA, and runs where there is one."""

from __future__ import annotations

import pytest
import torch

pytest_plugins = ["pytester"]


def test_gpu_marker_skips_without_cuda(pytester: pytest.Pytester) -> None:
    pytester.makeconftest((__import__("pathlib").Path(__file__).parent / "conftest.py").read_text())
    pytester.makepyfile(
        """
        import pytest, torch

        @pytest.mark.gpu
        def test_needs_gpu():
            assert torch.zeros(1, device=torch.device("cuda", 0)).item() == 0.0
        """
    )
    pytester.makeini("[pytest]\nmarkers =\n    gpu: needs a CUDA device\n")
    result = pytester.runpytest_inprocess()
    if torch.cuda.is_available():
        result.assert_outcomes(passed=1)
    else:
        result.assert_outcomes(skipped=1)


@pytest.mark.gpu
def test_grid_field_matches_on_cuda() -> None:
    """The field gives the same densities and colours on CUDA as on the CPU."""
    from mmstyle_ns.fields.grid_field import DenseGridField

    torch.manual_seed(0)
    field = DenseGridField(torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]]), resolution=16)
    points = torch.rand(1000, 3) * 2 - 1
    dirs = torch.nn.functional.normalize(torch.randn(1000, 3), dim=-1)
    cpu = field.color_from_corners(*field.corners(points), dirs)
    gpu_field = field.to(torch.device("cuda", 0))
    gpu = gpu_field.color_from_corners(*gpu_field.corners(points.cuda()), dirs.cuda()).cpu()
    torch.testing.assert_close(cpu, gpu, atol=1e-5, rtol=1e-4)
