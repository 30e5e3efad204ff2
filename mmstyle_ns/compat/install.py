"""``mmstyle-setup-env``: makes the active Python environment ready for nerfstudio on CPU-only torch.

It writes two things into the environment (both idempotent, safe to run again):

* ``mmstyle_ns_compat.pth`` in ``site-packages``: a one-line start-up hook that installs
  :mod:`mmstyle_ns.compat.torchvision_hook` in every Python process of the environment;
* an ``ffmpeg`` link next to the environment's ``python``, pointing at the binary that ``imageio-ffmpeg``
  ships, because ``ns-render`` calls ``ffmpeg`` by name.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path

PTH_NAME = "mmstyle_ns_compat.pth"
PTH_LINE = "import mmstyle_ns.compat.torchvision_hook as _mmstyle_hook; _mmstyle_hook.install()\n"


def install_pth(site_packages: Path | None = None) -> Path:
    """Writes the start-up hook into ``site_packages`` (default: this interpreter's) and returns its path."""
    target_dir = Path(site_packages or sysconfig.get_paths()["purelib"])
    target = target_dir / PTH_NAME
    if not target.exists() or target.read_text() != PTH_LINE:
        target.write_text(PTH_LINE)
    return target


def link_ffmpeg(bin_dir: Path | None = None) -> Path:
    """Links the ``imageio-ffmpeg`` binary as ``ffmpeg`` into ``bin_dir`` (default: next to ``python``)."""
    try:
        import imageio_ffmpeg
    except ImportError as err:  # pragma: no cover - a dependency of the package
        raise ImportError("imageio-ffmpeg is missing: pip install imageio-ffmpeg") from err
    source = Path(imageio_ffmpeg.get_ffmpeg_exe())
    target = Path(bin_dir or Path(sys.executable).parent) / "ffmpeg"
    if target.is_symlink() or target.exists():
        if target.resolve() == source.resolve():
            return target
        target.unlink()
    os.symlink(source, target)
    return target


def entrypoint() -> None:
    """Console entry point."""
    pth = install_pth()
    ffmpeg = link_ffmpeg()
    print(f"start-up hook: {pth}")
    print(f"ffmpeg:        {ffmpeg} -> {ffmpeg.resolve()}")


if __name__ == "__main__":
    entrypoint()
