"""Running a package CLI in a subprocess, as a user would (fresh interpreter, real exit code)."""

from __future__ import annotations

import os
import subprocess
import sys


def run_module(
    module: str, *args: str, timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m controlnet_ray.<module> *args`` with stdout/stderr captured as text
    (``env``: variables set on top of this process's environment).

    A subprocess, not ``main()``, where the test is about what a fresh interpreter imports
    (e.g. no Ray before a bad flag is reported) or about the real exit status.
    """
    return subprocess.run(
        [sys.executable, "-m", f"controlnet_ray.{module}", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
