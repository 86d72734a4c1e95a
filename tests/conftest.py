"""Helpers for privileged tests.

Tests that need root, loop devices or network namespaces FAIL when the ``CI``
environment variable is set and the facility is missing; otherwise they skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


def need(condition: bool, why: str) -> None:
    """Fail (under CI) or skip (locally) the current test unless ``condition`` holds."""
    if not condition:
        if os.environ.get("CI"):
            pytest.fail(why)
        else:
            pytest.skip(why)


def require_root(what: str) -> None:
    """Require effective root for ``what``; fail under CI, skip otherwise."""
    need(os.geteuid() == 0, f"{what} needs root")


LoopdevFactory = Callable[..., tuple[Path, str]]


@pytest.fixture
def loopdev_factory(tmp_path: Path) -> Iterator[LoopdevFactory]:
    """Yield ``make(size_bytes=1 << 20) -> (image_path, "/dev/loopN")``."""
    attached: list[str] = []
    checked = False
    counter = 0

    def make(size_bytes: int = 1 << 20) -> tuple[Path, str]:
        nonlocal checked, counter
        if not checked:
            need(
                os.geteuid() == 0
                and shutil.which("losetup") is not None
                and Path("/dev/loop-control").exists(),
                "loop devices need root and losetup",
            )
            checked = True
        counter += 1
        image = tmp_path / f"loop{counter}.img"
        with image.open("wb") as f:
            f.truncate(size_bytes)
        result = subprocess.run(
            ["losetup", "--find", "--show", str(image)],
            check=True,
            capture_output=True,
            text=True,
        )
        dev = result.stdout.strip()
        attached.append(dev)
        return image, dev

    yield make

    for dev in reversed(attached):
        try:
            subprocess.run(["losetup", "-d", dev], check=False, capture_output=True)
        except OSError:
            pass


@pytest.fixture
def promtool() -> str:
    """Return the path of ``promtool``; fail under CI, skip otherwise, if missing."""
    path = shutil.which("promtool")
    need(path is not None, "promtool not found (Debian package: prometheus)")
    assert path is not None
    return path
