"""The control API a running `sm-dist train` serves (aiohttp, which Ray ships, in a background thread).

    GET  /health      {"ok": true, "step": ..., "paused": ...}        open
    GET  /status      what `sm-dist status` shows, plus "live"       open
    GET  /metrics     Prometheus text format (sm_dist/service/prom.py)        open
    POST /scale       {"workers": N}                                  bearer token
    POST /pause, /resume, /checkpoint, /stop                          bearer token

It binds `run.api_host` (127.0.0.1 by default) on `run.api_port` (0: a free port) and writes the address
to `<run_dir>/api.json`; the bearer token, generated at start, is in `<run_dir>/api_token` (mode 0600).
A mutating call without `Authorization: Bearer <token>` gets 401, with a wrong token 403. Mutating
calls are queued to the driver loop (`Controller.submit`) and answered once the loop has applied them
(between two learner steps); one that waits longer than `answer_timeout_s` gets 202 (still queued).
`controller` is the driver's `sm_dist.orchestrator.control.Controller`, or any object with its `submit`, `status`,
`metrics_text` and `snapshot` (the unit tests pass a fake).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import secrets
import socket
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger("sm_dist.driver")

API_FILE, TOKEN_FILE = "api.json", "api_token"


def write_token(run_dir: Path) -> str:
    """A fresh bearer token in `<run_dir>/api_token`, readable by its owner only."""
    token = secrets.token_urlsafe(32)
    path = run_dir / TOKEN_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token)
    os.chmod(path, 0o600)  # an older file keeps its mode through O_CREAT
    return token


class ApiServer:
    def __init__(self, controller: Any, run_dir: str | Path, host: str = "127.0.0.1", port: int = 0,
                 answer_timeout_s: float = 120.0):  # fmt: skip
        self.ctl, self.run_dir = controller, Path(run_dir)
        self.host, self.port, self.answer_timeout_s = host, port, answer_timeout_s
        self.token = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> ApiServer:
        """Serve from a daemon thread; returns once the socket listens and api.json is written."""
        self.token = write_token(self.run_dir)
        ready = threading.Event()
        errors: list[BaseException] = []
        self._thread = threading.Thread(
            target=self._serve, args=(ready, errors), name="sm-dist-api", daemon=True
        )
        self._thread.start()
        ready.wait(30)
        if errors:
            raise errors[0]
        info = {
            "url": self.url,
            "host": self.host,
            "port": self.port,
            "pid": os.getpid(),
            "hostname": socket.gethostname(),
        }
        tmp = self.run_dir / (API_FILE + ".tmp")
        tmp.write_text(json.dumps(info))
        os.replace(tmp, self.run_dir / API_FILE)
        log.info(
            f"control API at {self.url} (sm-dist ctl {self.run_dir} status|scale N|pause|resume|checkpoint|stop)"
        )
        return self

    def _serve(self, ready: threading.Event, errors: list) -> None:
        from aiohttp import web

        self._loop = loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            self._runner = web.AppRunner(self.app(), access_log=None)
            loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, self.host, self.port)
            loop.run_until_complete(site.start())
            self.port = self._runner.addresses[0][1]
        except BaseException as e:  # e.g. the port is taken: start() raises it
            errors.append(e)
            ready.set()
            return
        ready.set()
        loop.run_forever()
        loop.run_until_complete(self._runner.cleanup())
        loop.close()

    def stop(self) -> None:
        (self.run_dir / API_FILE).unlink(missing_ok=True)  # `sm-dist ctl` now says the run is not live
        if self._loop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    # ---- the app
    def app(self):
        from aiohttp import web

        app = web.Application()
        app.add_routes([web.get("/health", self.health), web.get("/status", self.status),
                        web.get("/metrics", self.metrics)])  # fmt: skip
        for command in ("scale", "pause", "resume", "checkpoint", "stop"):
            app.router.add_post(f"/{command}", self._mutating(command))
        return app

    async def health(self, request):
        from aiohttp import web

        snap = self.ctl.snapshot
        return web.json_response({"ok": True, "step": snap.get("step"), "paused": bool(snap.get("paused"))})

    async def status(self, request):
        from aiohttp import web

        st = await asyncio.get_running_loop().run_in_executor(None, self.ctl.status)
        return web.json_response(json.loads(json.dumps(st, default=str)))

    async def metrics(self, request):
        from aiohttp import web

        text = self.ctl.metrics_text()
        return web.Response(text=text, content_type="text/plain", charset="utf-8",
                            headers={"X-Prometheus-Format": "0.0.4"})  # fmt: skip

    def _mutating(self, command: str):
        from aiohttp import web

        async def handler(request):
            auth = request.headers.get("Authorization", "")
            if not auth.startswith("Bearer "):
                return web.json_response({"error": f"missing bearer token (it is in {self.run_dir / TOKEN_FILE})"},
                                         status=401, headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
            if not hmac.compare_digest(auth[7:].strip().encode(), self.token.encode()):
                return web.json_response({"error": "wrong bearer token"}, status=403)
            arg = None
            if command == "scale":
                try:
                    body = await request.json()
                    arg = int(body["workers"])
                except (ValueError, KeyError, TypeError):
                    return web.json_response({"error": 'POST /scale takes {"workers": N}'}, status=400)
            fut = self.ctl.submit(command, arg)
            try:
                out = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(fut)), self.answer_timeout_s)
            except TimeoutError:
                return web.json_response({"queued": command, "note": "the driver applies it after the current step"},
                                         status=202)  # fmt: skip
            except ValueError as e:  # refused (e.g. scaling a collective transport)
                return web.json_response({"error": str(e)}, status=400)
            except Exception as e:
                return web.json_response({"error": f"{type(e).__name__}: {e}"}, status=500)
            return web.json_response(out)

        return handler
