"""Suite-wide settings.

``meshfed up`` picks its network with ``--network auto`` (netns where the machine can hold it, else loopback). The
tests that start a run without saying which network were written for loopback (they call sidecars' outbound
listeners on 127.0.0.1), so the suite defaults to loopback; the netns tests pass ``--network netns``."""

from __future__ import annotations

import os

os.environ.setdefault("MESHFED_NETWORK", "loopback")
