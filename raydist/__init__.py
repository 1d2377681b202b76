"""raydist: train PyTorch networks with parallel and distributed strategies on Ray.

Importing the package sets one thing before Ray is imported: a command that will join the local
Ray `raydist ray start` keeps must ask for that head's authentication mode. Ray reads
RAY_AUTH_MODE from the environment once, when it is imported, so setting it at join time is too
late (a joining driver is then refused as unauthenticated)."""

from __future__ import annotations

import os
import re
from pathlib import Path

LOCAL_RAY = "RAYDIST_LOCAL_RAY"
AUTH_MODE = "RAY_AUTH_MODE"


def local_ray_file() -> Path:
    """Where `raydist ray start` writes where its Ray is: $RAYDIST_LOCAL_RAY, else
    ~/.cache/raydist/local-ray.yaml."""
    given = os.environ.get(LOCAL_RAY)
    return Path(given) if given else Path.home() / ".cache" / "raydist" / "local-ray.yaml"


def _kept_head_auth() -> str | None:
    """The auth mode of a kept local Ray whose keeper still runs; None if there is none (the
    full checks, owner, mode bits, address, are raydist.runtime.connect.local_head's, at join time)."""
    try:
        text = local_ray_file().read_text()
        pid = int(re.search(r"^pid: (\d+)$", text, re.M).group(1))  # type: ignore[union-attr]
        os.kill(pid, 0)
        return re.search(r"^auth_mode: (\w+)$", text, re.M).group(1)  # type: ignore[union-attr]
    except (OSError, AttributeError, ValueError):
        return None


if AUTH_MODE not in os.environ and "RAY_ADDRESS" not in os.environ:
    _mode = _kept_head_auth()
    if _mode:
        os.environ[AUTH_MODE] = _mode
