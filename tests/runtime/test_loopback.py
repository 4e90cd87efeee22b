"""The network rule, checked where it is kept: every server of the test session (its Ray, its S3
server) listens on loopback only, and so does the private Ray a stage starts for a run on one machine
(`runtime.local_ray.init_ray`, dashboard on as by default), in a process without the tests' setting.
Asked for 127.0.0.1, Ray on Linux serves on the machine's LAN address, on every interface, unless
`keep_on_loopback` holds it there."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from diffmix_ray.runtime.local_ray import LOOPBACK_ENV

from tests.paths import REPO

LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}

# Runs in its own process: starts the private Ray as a stage does, lists what its process tree
# listens on once Ray is up (the dashboard and its agents included), and stops that Ray.
PRIVATE_RAY = """
import json, time
import ray
from diffmix_ray.runtime.local_ray import init_ray
from tests.runtime.test_loopback import _tree_listening

init_ray()
time.sleep(2)  # the agents open their ports a moment after ray.init returns
print(json.dumps(_tree_listening()))
ray.shutdown()
"""


def _tree_listening() -> list[tuple[str, str, int]]:
    """(process name, address, port) of every listening socket of this process and its descendants."""
    import psutil

    me = psutil.Process()
    found = []
    for p in [me, *me.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            found += [(p.name(), c.laddr.ip, c.laddr.port) for c in p.net_connections(kind="inet")
                      if c.status == psutil.CONN_LISTEN]
    return found


def _not_loopback(found) -> list:
    return [f for f in found if f[1] not in LOOPBACK]


@pytest.mark.ray
@pytest.mark.slow
def test_the_sessions_servers_and_a_stages_private_ray_listen_on_loopback_only(ray_local, s3_server):
    session = _tree_listening()
    names = {name for name, _, _ in session}
    assert "gcs_server" in names and "raylet" in names  # the session's Ray is among them
    assert not _not_loopback(session), _not_loopback(session)

    temp_dir = tempfile.mkdtemp(prefix="dmxlb-", dir="/tmp")  # short: Ray's socket paths stay < 108 chars
    env = {k: v for k, v in os.environ.items() if k not in (LOOPBACK_ENV, "RAY_ADDRESS", "DIFFMIX_RAY_DASHBOARD")}
    env.update({"RAY_TMPDIR": temp_dir, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)})
    try:
        result = subprocess.run([sys.executable, "-c", PRIVATE_RAY], cwd=REPO, env=env, capture_output=True,
                                text=True, timeout=180)
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert result.returncode == 0, result.stderr[-3000:]
    private = [tuple(f) for f in json.loads(result.stdout.strip().splitlines()[-1])]
    names = {name for name, _, _ in private}
    assert {"gcs_server", "raylet"} <= names and any("ashboard" in n for n in names), private
    assert not _not_loopback(private), _not_loopback(private)
