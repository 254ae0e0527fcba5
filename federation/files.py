"""Atomic file writes, shared by the trust store and the ``meshfed`` commands that write manifests.

Errors are the OS's (``OSError``); each caller wraps them in its own domain's error, naming the path.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, data: bytes, *, mode: int = 0o644, durable: bool = False) -> None:
    """Write ``data`` to ``path`` all at once: into a temporary file beside it (created 0600, so a secret is never
    readable by others, even briefly), set to ``mode``, then renamed over ``path``. ``durable`` syncs the data to
    disk before the rename. Missing parent directories are created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
