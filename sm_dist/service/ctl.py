"""`sm-dist ctl RUN_DIR status|health|metrics|scale N|pause|resume|checkpoint|stop`: the control API's
client (sm_dist/service/api.py). It finds the address in `<run_dir>/api.json` and the bearer token in
`<run_dir>/api_token`; a run that is not live is a one-line `UserError`. Standard library only.
"""

from __future__ import annotations

import contextlib
import json
import urllib.error
import urllib.request
from pathlib import Path

from sm_dist.errors import UserError

READ = {"status", "health", "metrics"}
WRITE = {"scale", "pause", "resume", "checkpoint", "stop"}


def _address(run_dir: Path) -> str:
    info_path = run_dir / "api.json"
    if not info_path.is_file():
        problem = "is not a live run (no api.json: not started, finished, or run.api_port is null)."
        if not run_dir.is_dir():
            problem = "does not exist."
        raise UserError(
            str(run_dir), problem, "start it with sm-dist train; for a finished run use sm-dist status"
        )
    try:
        return json.loads(info_path.read_text())["url"]
    except (ValueError, KeyError) as e:
        raise UserError(
            str(info_path), f"is not a control API address file ({e}).", "restart the run"
        ) from None


def call(run_dir: str | Path, command: str, arg: int | None = None, timeout_s: float = 180.0):
    """The API's answer to `command` (a dict, or the text of /metrics)."""
    d = Path(run_dir)
    if command not in READ | WRITE:
        raise UserError(command, "is not a ctl command.", f"use one of {', '.join(sorted(READ | WRITE))}")
    url = f"{_address(d)}/{command}"
    headers, data = {}, None
    if command in WRITE:
        try:
            headers["Authorization"] = "Bearer " + (d / "api_token").read_text().strip()
        except OSError as e:
            raise UserError(
                str(d / "api_token"), f"cannot be read ({e.strerror}).", "run ctl as the run's owner"
            ) from None
        body = {"workers": arg} if command == "scale" else {}
        data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
    req = urllib.request.Request(
        url, data=data, headers=headers, method="POST" if command in WRITE else "GET"
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            text = r.read().decode()
    except urllib.error.HTTPError as e:
        msg = e.read().decode()
        with contextlib.suppress(ValueError):
            msg = json.loads(msg).get("error", msg)
        raise UserError(f"ctl {command}", f"the run refused it (HTTP {e.code}): {msg}.") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise UserError(
            str(d),
            f"its driver does not answer at {url} ({reason}): the run has stopped or its host is unreachable.",
            "sm-dist status shows how it ended",
        ) from None
    return text if command == "metrics" else json.loads(text)
