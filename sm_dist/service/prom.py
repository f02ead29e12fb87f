"""`GET /metrics`: the control snapshot (sm_dist/orchestrator/control.py) in Prometheus' text format, written by
`prometheus_client` (a custom collector over one snapshot; no global registry, no process metrics).

Series (all gauges, prefixed `sm_dist_`): step, total_steps, steps_per_second, loss{term}, rollout
tokens_per_second, backspace_rate, buffer_rows{buffer,source}, buffer_added_rows{buffer},
buffer_staleness (mean versions behind, of the replay rows sampled), sync_seconds{phase},
weights_version, rollout_workers, rollout_workers_joining, busy_fraction{role}, learner_wait_seconds,
paused.
"""

from __future__ import annotations

from typing import Any

# metric key (MetricsLogger's) -> (series, help, labels)
_FROM_METRICS = {
    "rollout/tokens_per_s": ("rollout_tokens_per_second", "Rollout actions generated per second, per worker batch."),
    "rollout/backspace_rate": ("rollout_backspace_rate", "Fraction of rollout actions that are <bkspc>."),
    "buffer/staleness_mean": ("buffer_staleness", "Mean weight versions behind of the replay rows sampled."),
    "perf/learner_wait_s_total": ("learner_wait_seconds", "Seconds the learner waited for fresh rollouts."),
}  # fmt: skip


def _families(snap: dict[str, Any]):
    from prometheus_client.core import GaugeMetricFamily

    def gauge(name: str, doc: str, value: Any = None, labels: dict[str, Any] | None = None):
        g = GaugeMetricFamily(f"sm_dist_{name}", doc, labels=list(labels or {}))
        if value is not None:
            g.add_metric([str(v) for v in (labels or {}).values()], float(value))
        return g

    m = snap.get("metrics") or {}
    yield gauge("step", "Learner steps done.", snap.get("step", 0))
    if snap.get("total_steps") is not None:
        yield gauge("total_steps", "Learner steps the run is set to do.", snap["total_steps"])
    yield gauge("steps_per_second", "Learner steps per second, recently.", snap.get("steps_per_s") or 0.0)
    yield gauge("weights_version", "Weights version last published.", snap.get("version", 0))
    yield gauge("rollout_workers", "Live rollout workers.", len(snap.get("workers", [])))
    yield gauge("rollout_workers_joining", "Rollout workers starting.", snap.get("joining", 0))
    yield gauge("paused", "1 while the run is paused (control API).", bool(snap.get("paused")))
    loss = GaugeMetricFamily("sm_dist_loss", "Loss terms of the last logged step.", labels=["term"])
    for k, v in sorted(m.items()):
        if k.startswith("loss/") and v is not None:
            loss.add_metric([k.split("/", 1)[1]], float(v))
    yield loss
    for key, (name, doc) in _FROM_METRICS.items():
        yield gauge(name, doc, m.get(key, 0.0) or 0.0)
    sync = GaugeMetricFamily(
        "sm_dist_sync_seconds", "Seconds of the last weight publish, by phase.", labels=["phase"]
    )
    for k, v in sorted({**(snap.get("sync") or {}), **m}.items()):
        if k.startswith("sync/") and k.endswith("_s") and v is not None:
            sync.add_metric([k[5:-2]], float(v))
    yield sync
    busy = GaugeMetricFamily("sm_dist_busy_fraction", "Fraction of wall time spent working.", labels=["role"])
    for role in ("learner", "rollout"):
        busy.add_metric([role], float(m.get(f"perf/{role}_busy", 0.0) or 0.0))
    yield busy
    rows = GaugeMetricFamily("sm_dist_buffer_rows", "Live buffer rows.", labels=["buffer", "source"])
    added = GaugeMetricFamily("sm_dist_buffer_added_rows", "Rows ever added to a buffer.", labels=["buffer"])
    for buf, st in sorted((snap.get("buffers") or {}).items()):
        for src, n in sorted((st.get("rows_by_source") or {}).items()):
            rows.add_metric([buf, src], float(n))
        added.add_metric([buf], float(st.get("added_rows", 0)))
    yield rows
    yield added


def render(snap: dict[str, Any]) -> str:
    from prometheus_client import CollectorRegistry, generate_latest

    class _Snapshot:
        def collect(self):
            return _families(snap)

    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Snapshot())
    return generate_latest(reg).decode()
