"""The local Ray that `sm-dist train` starts listens on loopback only (issue 12): during a run, every
listening socket of the driver's process tree (GCS, raylet, object manager, dashboard and runtime-env
agents, the actors' workers, the driver) is on 127.0.0.1 / ::1 (or ::ffff:127.0.0.1)."""

from __future__ import annotations

import ipaddress
import signal
import time

import pytest

from tests.integration.test_pipeline import _metrics, _start, ray_tmp, train_cmd  # noqa: F401

pytestmark = pytest.mark.slow
psutil = pytest.importorskip("psutil")


def _listening(root_pid: int) -> list[tuple[str, int, str]]:
    """(address, port, process name) of every TCP socket listening in `root_pid`'s process tree."""
    root = psutil.Process(root_pid)
    tree = {root.pid: root.name()} | {p.pid: p.name() for p in root.children(recursive=True)}
    return [
        (c.laddr.ip, c.laddr.port, tree[c.pid])
        for c in psutil.net_connections("tcp")
        if c.status == psutil.CONN_LISTEN and c.pid in tree
    ]


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


def test_local_ray_listens_on_loopback_only(tmp_path, ray_tmp):  # noqa: F811
    run = tmp_path / "run"
    args = train_cmd(run, "run.total_steps=200")
    proc = _start(tmp_path, ray_tmp, args)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None and not _metrics(run):
            time.sleep(0.5)
        assert proc.poll() is None and _metrics(run), proc.stdout.read()[-3000:]
        sockets = _listening(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=180)
    names = {name for _, _, name in sockets}
    assert {"gcs_server", "raylet"} <= names, sockets  # the tree was found: the check is not vacuous
    assert any(n.startswith("ray::RolloutWorker") for n in names), sockets
    exposed = [s for s in sockets if not _loopback(s[0])]
    assert exposed == [], f"listening beyond loopback: {exposed}"
