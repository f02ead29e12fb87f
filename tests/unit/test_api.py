"""The control API (sm_dist/service/api.py) against a fake controller, and its client (`sm-dist ctl`): every
endpoint, 401 without the token and 403 with a wrong one, the token file's mode, nothing listening on
a non-loopback address, /metrics parsed by prometheus_client's own parser with every series; and the
loop side (sm_dist/orchestrator/control.py): calls applied between steps, pause and resume."""

from __future__ import annotations

import json
import stat
import urllib.error
import urllib.request
from asyncio import run
from concurrent.futures import Future

import pytest

from sm_dist.orchestrator.control import Controller
from sm_dist.service.api import ApiServer

SNAP = {
    "step": 12, "total_steps": 100, "version": 3, "paused": False, "steps_per_s": 2.5, "workers": ["w0", "w1"],
    "joining": 1,
    "buffers": {"replay": {"rows_by_source": {"model": 40, "data": 0}, "added_rows": 48},
                "expert": {"rows_by_source": {"data": 200, "model": 0}, "added_rows": 200}},
    "metrics": {"loss/total": 1.5, "loss/bc": 1.2, "loss/sm": 0.3, "rollout/tokens_per_s": 900.0,
                "rollout/backspace_rate": 0.05, "buffer/staleness_mean": 1.25, "sync/publish_s": 0.02,
                "sync/serialize_s": 0.01, "perf/learner_busy": 0.6, "perf/rollout_busy": 0.8,
                "perf/learner_wait_s_total": 4.0},
}  # fmt: skip


class FakeController:
    def __init__(self):
        self.snapshot = dict(SNAP)
        self.calls = []

    def submit(self, command, arg=None):
        self.calls.append((command, arg))
        f = Future()
        if command == "scale" and arg > 8:
            f.set_exception(ValueError("workers must be between 1 and 8"))
        else:
            f.set_result({"done": command, "arg": arg})
        return f

    def status(self):
        return {"state": "running", "step": 12, "live": self.snapshot}

    def metrics_text(self):
        from sm_dist.service.prom import render

        return render(self.snapshot)


@pytest.fixture
def server(tmp_path):
    s = ApiServer(FakeController(), tmp_path).start()
    yield s
    s.stop()


def req(s, path, method="GET", token=None, body=None):
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    data = None if body is None and method == "GET" else json.dumps(body or {}).encode()
    r = urllib.request.Request(s.url + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(r, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_read_only_endpoints_are_open(server):
    code, body = req(server, "/health")
    assert code == 200 and json.loads(body) == {"ok": True, "step": 12, "paused": False}
    code, body = req(server, "/status")
    assert code == 200 and json.loads(body)["live"]["workers"] == ["w0", "w1"]
    info = json.loads((server.run_dir / "api.json").read_text())
    assert info["url"] == server.url and info["host"] == "127.0.0.1" and info["port"] > 0


@pytest.mark.parametrize("command", ["scale", "pause", "resume", "checkpoint", "stop"])
def test_mutating_calls_need_the_token(server, command):
    body = {"workers": 3} if command == "scale" else {}
    assert req(server, f"/{command}", "POST", body=body)[0] == 401
    assert req(server, f"/{command}", "POST", token="wrong", body=body)[0] == 403
    assert server.ctl.calls == []
    code, out = req(server, f"/{command}", "POST", token=server.token, body=body)
    assert code == 200 and json.loads(out)["done"] == command
    assert server.ctl.calls == [(command, 3 if command == "scale" else None)]


def test_a_refused_or_malformed_scale_is_a_400(server):
    assert req(server, "/scale", "POST", token=server.token, body={"workers": 99})[0] == 400
    code, out = req(server, "/scale", "POST", token=server.token, body={"n": 2})
    assert code == 400 and "workers" in out


def test_the_token_file_is_private(server):
    p = server.run_dir / "api_token"
    assert (
        stat.S_IMODE(p.stat().st_mode) == 0o600 and p.read_text() == server.token and len(server.token) >= 32
    )


def test_nothing_listens_on_a_non_loopback_address(server):
    import psutil

    mine = [
        c
        for c in psutil.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == server.port
    ]
    assert mine and {c.laddr.ip for c in mine} <= {"127.0.0.1", "::1"}, mine


def test_metrics_parse_and_have_the_series(server):
    from prometheus_client.parser import text_string_to_metric_families

    code, text = req(server, "/metrics")
    assert code == 200
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("step", "steps_per_second", "loss", "rollout_tokens_per_second", "rollout_backspace_rate",
                 "buffer_rows", "buffer_staleness", "sync_seconds", "weights_version", "rollout_workers",
                 "busy_fraction"):  # fmt: skip
        assert f"sm_dist_{name}" in fams, name
    val = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in fams.values() for s in f.samples}
    assert val[("sm_dist_loss", (("term", "bc"),))] == 1.2
    assert val[("sm_dist_buffer_rows", (("buffer", "replay"), ("source", "model")))] == 40
    assert val[("sm_dist_busy_fraction", (("role", "learner"),))] == 0.6
    assert val[("sm_dist_rollout_workers", ())] == 2 and val[("sm_dist_weights_version", ())] == 3


def test_ctl_client_finds_the_address_and_token(server, capsys):
    from sm_dist.errors import UserError
    from sm_dist.service.ctl import call

    assert call(server.run_dir, "scale", 2) == {"done": "scale", "arg": 2}
    assert call(server.run_dir, "health")["ok"] is True
    assert "sm_dist_step 12.0" in call(server.run_dir, "metrics")
    with pytest.raises(UserError, match=r"refused it \(HTTP 400\): workers must be between"):
        call(server.run_dir, "scale", 99)
    server.stop()
    with pytest.raises(UserError, match="is not a live run"):
        call(server.run_dir, "status")


class FakeRun:
    """What the control calls act on (`sm_dist.orchestrator.control.Controllable`), recording them."""

    def __init__(self, step=5):
        self.stopping, self.paused, self.step, self.events = False, False, step, []

    async def scale(self, n):
        raise ValueError("this run cannot scale its rollout workers")

    def pause(self, paused):
        self.paused = paused
        self.events.append("p" if paused else "r")

    def stop(self):
        self.stopping = True

    async def checkpoint(self):
        return {"checkpoint": "c", "step": self.step}

    async def between_steps(self, buffers):
        self.events.append("b")

    async def poll(self, timeout_s):
        self.events.append("poll")

    def view(self):
        from sm_dist.orchestrator.control import RunView

        return RunView(self.step, 1, 9, ["w0"], 0)

    def buffer_stats(self):
        return {}


def test_the_loop_applies_calls_between_steps_and_pause_blocks_until_resume(tmp_path):
    fake = FakeRun()
    ctl = Controller(tmp_path, fake, buffer_refresh_s=1e9)
    pause, resume = ctl.submit("pause"), ctl.submit("resume")
    run(ctl.apply())  # both applied in order: not paused afterwards
    assert pause.result(0)["paused"] is True and resume.result(0)["paused"] is False
    assert fake.events == ["p", "r", "b"] and not fake.paused
    ctl.submit("pause")
    fake.events = []

    async def poll(timeout_s):  # while paused, the rollouts' tasks run; a resume arrives meanwhile
        fake.events.append("poll")
        ctl.submit("resume")

    fake.poll = poll
    run(ctl.apply())
    assert fake.events == ["p", "b", "poll", "r", "b"] and not ctl.paused and not fake.paused
    stop = ctl.submit("stop")
    run(ctl.apply())
    assert stop.result(0)["stopping"] is True and fake.stopping
    with pytest.raises(ValueError, match="unknown command"):
        ctl.submit("reboot")
    scale = ctl.submit("scale", 2)
    run(ctl.apply())
    with pytest.raises(ValueError, match="cannot scale"):
        scale.result(0)
    ckpt = ctl.submit("checkpoint")
    run(ctl.apply())
    assert ckpt.result(0) == {"checkpoint": "c", "step": 5}


def test_sm_dist_ctl_on_a_run_that_is_not_live_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    from sm_dist.cli import main

    # leave the loggers to pytest
    monkeypatch.setattr("sm_dist.service.logs.setup_logging", lambda *a, **k: None)

    (tmp_path / "api.json").write_text(json.dumps({"url": "http://127.0.0.1:9"}))  # nothing listens there
    for argv, msg in ((["ctl", str(tmp_path / "nope"), "status"], "does not exist"),
                      (["ctl", str(tmp_path), "health"], "does not answer"),
                      (["ctl", str(tmp_path), "scale"], "needs the number")):  # fmt: skip
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and msg in err and len(err.strip().splitlines()) == 1, err


def test_sync_seconds_keep_the_last_publish_between_publishing_steps(tmp_path):
    """Only a step that publishes carries sync/... timings; the logged step is rarely that one, so the
    snapshot keeps the last publish's, and /metrics always has sm_dist_sync_seconds samples."""
    from prometheus_client.parser import text_string_to_metric_families

    from sm_dist.service.prom import render

    run = FakeRun()
    ctl = Controller(tmp_path, run, buffer_refresh_s=1e9)
    ctl.update({"loss/total": 1.0, "sync/publish_s": 0.25, "sync/serialize_s": 0.125})
    run.step = 6
    ctl.update({"loss/total": 0.9})  # no publish this step
    fams = {f.name: f for f in text_string_to_metric_families(render(ctl.snapshot))}
    got = {s.labels["phase"]: s.value for s in fams["sm_dist_sync_seconds"].samples}
    assert got == {"publish": 0.25, "serialize": 0.125}
