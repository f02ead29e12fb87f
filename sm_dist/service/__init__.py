"""What serves and reports a run: the control API, its client, metrics, status and logging.

- api.py: the control API server a running `sm-dist train` serves (aiohttp thread).
- ctl.py: `sm-dist ctl`, the control API's client (standard library only).
- prom.py: `GET /metrics` in Prometheus' text format.
- status.py: who owns a run directory and where a run stands (`sm-dist status`).
- metrics.py: the metrics sink (`metrics.jsonl`, TensorBoard, optionally W&B).
- logs.py: the `sm_dist` logger tree, console, run-directory file, JSON lines.
"""
