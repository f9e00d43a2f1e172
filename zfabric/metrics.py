"""Prometheus metrics of a scheduler (layer 5: the optional ``observe`` extra's prometheus-client).

The rule it keeps: the HTTP thread never touches the scheduler's state. The scheduler's loop takes a
`snapshot` a few times a second; a scrape reads the latest one. The histograms are counted by the
scheduler itself (`zfabric.histogram`: one bisect a task), not by prometheus-client's per-observation
locks, which would cost the hot path a microsecond or two a task.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator

from .errors import ConfigError

log = logging.getLogger(__name__)

TASK_STATES = ("submitted", "done", "failed", "cancelled", "redelivered", "retried", "lost", "rejected")


def require_prometheus() -> Any:
    try:
        import prometheus_client
    except ImportError:
        raise ConfigError("--metrics-port needs prometheus-client, in the 'observe' extra: "
                          "pip install 'zfabric[observe]'") from None
    return prometheus_client


def snapshot(status: dict[str, Any], queue_wait: Any, round_trip: Any) -> dict[str, Any]:
    """What a scrape shows, from the scheduler's status and its histograms (copied: the loop moves on)."""
    return {"status": status, "queue_wait": queue_wait.copy(), "round_trip": round_trip.copy()}


class _Collector:
    def __init__(self, latest: "MetricsServer") -> None:
        self.latest = latest

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
        snap = self.latest.snapshot
        if snap is None:
            return
        status = snap["status"]
        tasks = CounterMetricFamily("zfabric_tasks", "Tasks by what happened to them.", labels=["state"])
        for state in TASK_STATES:
            tasks.add_metric([state], status.get(state, 0))
        yield tasks
        for name, key, help_text in (("zfabric_queued", "queued", "Tasks waiting for a worker."),
                                     ("zfabric_running", "running", "Tasks running on workers."),
                                     ("zfabric_delayed", "delayed", "Tasks waiting out a retry's back-off.")):
            yield GaugeMetricFamily(name, help_text, value=status.get(key, 0))
        yield GaugeMetricFamily("zfabric_workers", "Live workers.", value=len(status["workers"]))
        yield GaugeMetricFamily("zfabric_clients", "Registered clients.", value=status.get("clients", 0))
        waiting = GaugeMetricFamily("zfabric_waiting_for_route", "Tasks waiting for workers with these tags and "
                                    "resources.", labels=["route"])
        for route in status.get("waiting", []):
            waiting.add_metric([",".join(route["tags"] + [f"{k}={v}" for k, v in route["resources"].items()])],
                               route["queued"])
        yield waiting
        running = GaugeMetricFamily("zfabric_worker_running", "Tasks running on a worker.", labels=["worker", "host", "id"])
        free = GaugeMetricFamily("zfabric_worker_free", "Free slots of a worker.", labels=["worker", "host", "id"])
        done = CounterMetricFamily("zfabric_worker_tasks", "Tasks a worker finished.", labels=["worker", "host", "id"])
        for w in status["workers"]:
            labels = [w["name"], w["host"], w["id"]]  # the id: two workers may share a name
            running.add_metric(labels, w["running"])
            free.add_metric(labels, w["free"])
            done.add_metric(labels, w["done"])
        yield from (running, free, done)
        bad = CounterMetricFamily("zfabric_bad_input", "Malformed network input the scheduler dropped.",
                                  labels=["kind"])
        for kind, count in status.get("bad_input", {}).items():
            bad.add_metric([kind], count)
        yield bad
        for name, key, help_text in (
                ("zfabric_queue_wait_seconds", "queue_wait", "From SUBMIT to the task's DISPATCH."),
                ("zfabric_round_trip_seconds", "round_trip", "From SUBMIT to the worker's DONE, as the "
                                                             "scheduler sees it.")):
            histogram = snap[key]
            family = HistogramMetricFamily(name, help_text)
            family.add_metric([], histogram.cumulative(), histogram.total)
            yield family


class MetricsServer:
    """Serves ``http://HOST:PORT/metrics`` from a thread; `snapshot` is replaced by the scheduler's loop."""

    def __init__(self, host: str, port: int) -> None:
        prometheus_client = require_prometheus()
        self.snapshot: dict[str, Any] | None = None
        self.registry = prometheus_client.CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))  # type: ignore[arg-type]
        try:
            self._server, self._thread = prometheus_client.start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {host}:{port}: {exc}") from None
        self.port = self._server.server_port
        log.info("metrics at http://%s:%d/metrics", host, self.port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
