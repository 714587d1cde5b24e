"""Prometheus metrics of the daemon (prometheus-client), and the HTTP endpoint serving them.

Three sources, one registry per ``MetricsServer`` (never the library's global
one, so two daemons in one test process stay apart):

- ``StatusCollector``: the figures ``cyclemirror status --json`` shows, one
  gauge or counter per field, built from a fresh status document at every
  scrape and labelled by volume and target (outgoing) or by source node and
  volume (incoming).  A figure not known yet is absent, never a fake 0.
- ``CycleHistograms``: histograms of each applied cycle's duration, wire
  bytes, and the RPO age it ended; the daemon observes them from the sender
  driver's ``on_applied`` hook (``daemon.mirrors``).
- prometheus-client's process, platform and garbage-collector collectors:
  CPU seconds, resident and virtual memory, open and maximum file
  descriptors, start time, the Python version.

Every name is listed in docs/operations.md and stays stable.
``render_metrics`` is pure (a status document in, exposition text out);
``MetricsServer`` is a threading HTTP server (one thread per scrape) that
answers ``GET /metrics`` and 404 for any other path.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from cyclemirror.errors import UsageError

PHASES = ("freezing", "copying", "applying", "idle", "broken", "reconnecting")
RPO_STATES = ("ok", "at_risk", "violated")
VERIFY_STATES = ("never", "running", "clean", "mismatch", "repairing", "repaired", "failed")
# The text format prometheus-client writes (names here need none of 1.0.0's escaping).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Bucket bounds: a cycle lasts from milliseconds (a small delta on a LAN) to
# hours (a first copy of a big volume); a cycle ships from a few KiB to TiB;
# the RPO age is about the interval (default 30 s) when all is well and grows
# while a target is away.
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600,
                    14400, float("inf"))
BYTES_BUCKETS = tuple(float(1 << s) for s in range(12, 42, 3)) + (float("inf"),)  # 4 KiB..2 TiB
RPO_BUCKETS = (1, 2, 5, 10, 15, 30, 45, 60, 120, 300, 600, 1800, 3600, 14400, 86400,
               float("inf"))

log = logging.getLogger("cyclemirror.daemon.metrics")


class _Families:
    """Metric families by name, in the order first added; None values are left out."""

    def __init__(self):
        self.families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}

    def add(self, name: str, kind: str, help_text: str, labels: dict, value) -> None:
        if value is None:
            return  # unknown yet (no applied cycle): absent, never a fake 0
        family = self.families.get(name)
        if family is None:
            cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            family = self.families[name] = cls(name, help_text, labels=list(labels))
        family.add_metric([str(v) for v in labels.values()], float(value))


def status_families(doc: dict) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
    """The metric families of one status document (docs/operations.md, "Metrics")."""
    e = _Families()
    node = doc.get("node", {})
    e.add("cyclemirror_info", "gauge", "Constant 1, labelled with this daemon's node.",
          {"node_id": node.get("id", ""), "node_name": node.get("name") or "",
           "version": node.get("version", "")}, 1)
    e.add("cyclemirror_volumes", "gauge", "Volumes in this store.", {},
          len(doc.get("volumes", [])))
    for m in doc.get("mirrors", []):
        lb = {"volume": m["volume"], "target": m["target"]}
        last = m.get("last_cycle") or {}
        e.add("cyclemirror_mirror_cycle", "gauge", "Number of the newest cycle started.",
              lb, m.get("cycle", 0))
        e.add("cyclemirror_mirror_applied_cycle", "gauge",
              "Newest cycle the target has applied.", lb, m.get("applied_cycle", 0))
        for phase in PHASES:
            e.add("cyclemirror_mirror_phase", "gauge", "1 for the mirror's current phase.",
                  dict(lb, phase=phase), int(m.get("phase") == phase))
        e.add("cyclemirror_mirror_rpo_age_seconds", "gauge",
              "Now minus the freeze time of the newest cycle applied on the target.",
              lb, m.get("rpo_age"))
        e.add("cyclemirror_mirror_applied_freeze_time_seconds", "gauge",
              "Unix time of the freeze of the newest applied cycle.", lb,
              m.get("applied_freeze_time"))
        e.add("cyclemirror_mirror_last_cycle_bytes", "gauge",
              "Bytes sent on the wire by the last completed cycle.", lb, last.get("bytes"))
        e.add("cyclemirror_mirror_last_cycle_raw_bytes", "gauge",
              "Uncompressed bytes of the last completed cycle's delta.", lb,
              last.get("raw_bytes"))
        e.add("cyclemirror_mirror_last_cycle_duration_seconds", "gauge",
              "Duration of the last completed cycle: its copy, from the first to the last frame sent.",
              lb, last.get("duration"))
        e.add("cyclemirror_mirror_throughput_bytes_per_second", "gauge",
              "Uncompressed bytes per second of the last completed cycle.", lb,
              last.get("throughput"))
        e.add("cyclemirror_mirror_compression_ratio", "gauge",
              "Raw bytes over wire bytes of the last completed cycle.", lb,
              last.get("compression_ratio"))
        e.add("cyclemirror_mirror_shipped_bytes", "counter",
              "Bytes sent on the wire to this target since the daemon started.", lb,
              m.get("shipped_bytes_total", 0))
        e.add("cyclemirror_mirror_cycles", "counter",
              "Cycles applied on this target since the daemon started.", lb,
              m.get("cycles_total", 0))
        e.add("cyclemirror_mirror_error", "gauge", "1 if the mirror's last attempt failed.",
              lb, int(bool(m.get("last_error"))))
        e.add("cyclemirror_mirror_committed_cycle", "gauge",
              "Newest cycle the target holds durably (committed; applied follows).", lb,
              m.get("committed_cycle"))
        e.add("cyclemirror_mirror_interval_seconds", "gauge",
              "Time from one freeze to the next now (adapts to an RPO objective).", lb,
              m.get("interval_now"))
        rpo = m.get("rpo")
        if rpo:
            e.add("cyclemirror_mirror_rpo_objective_seconds", "gauge",
                  "The RPO objective of the mirror (mirror start --rpo).", lb, rpo["objective"])
            e.add("cyclemirror_mirror_rpo_predicted_seconds", "gauge",
                  "Worst RPO age expected before the target's next apply.", lb,
                  rpo["predicted"] if rpo["predicted"] != float("inf") else None)
            for state in RPO_STATES:
                e.add("cyclemirror_mirror_rpo_state", "gauge",
                      "1 for the mirror's state against its RPO objective.",
                      dict(lb, state=state), int(rpo["state"] == state))
        pacing = m.get("pacing")
        if pacing:  # mirror start --pace
            e.add("cyclemirror_mirror_write_pace_limit_bytes_per_second", "gauge",
                  "Rate the volume's writers are held to now (--pace); 0: not held.", lb,
                  pacing["limit"] or 0)
            e.add("cyclemirror_mirror_write_pace_wait_seconds_total", "counter",
                  "Seconds the volume's writers waited for the mirror (--pace).", lb,
                  pacing["waited_seconds"])
        for phase, seconds in ((last.get("phases") or {}).items()):
            e.add("cyclemirror_mirror_last_cycle_phase_seconds", "gauge",
                  "Seconds the last completed cycle spent in each phase (wait, freeze, pack, "
                  "send, commit, apply, merge).", dict(lb, phase=phase), seconds)
        verify = m.get("verify") or {}  # docs/verify.md
        for state in VERIFY_STATES:
            e.add("cyclemirror_mirror_verify_state", "gauge",
                  "1 for the state of the mirror's last verify.", dict(lb, state=state),
                  int(verify.get("state", "never") == state))
        e.add("cyclemirror_mirror_verify_age_seconds", "gauge",
              "Seconds since the last verify of this target finished.", lb, verify.get("age"))
        e.add("cyclemirror_mirror_verify_mismatched_blocks", "gauge",
              "Blocks the last verify found differing.", lb, verify.get("mismatched_blocks"))
        e.add("cyclemirror_mirror_verify_unrepaired", "gauge",
              "1 while blocks a verify found differing are not repaired on the target.", lb,
              int(verify.get("state") in ("mismatch", "repairing")))
        progress = m.get("progress")
        if progress:
            e.add("cyclemirror_mirror_progress_done_bytes", "gauge",
                  "Bytes of the running cycle's owed blocks (data and zero runs) sent so far.",
                  lb, progress.get("done"))
            e.add("cyclemirror_mirror_progress_total_bytes", "gauge",
                  "Bytes of the running cycle's owed blocks in all (the volume for a full copy).",
                  lb, progress.get("total"))
            e.add("cyclemirror_mirror_progress_wire_bytes", "gauge",
                  "Bytes the running cycle has sent on the wire so far.", lb,
                  progress.get("wire_bytes"))
    for m in doc.get("incoming", []):
        lb = {"source_node": m.get("source_node", ""), "volume": m["volume"]}
        e.add("cyclemirror_incoming_applied_cycle", "gauge",
              "Newest cycle applied to this mirror image.", lb, m.get("applied_cycle", 0))
        e.add("cyclemirror_incoming_freeze_time_seconds", "gauge",
              "Unix time of the freeze of the newest applied cycle.", lb,
              m.get("freeze_time"))
        scrub = m.get("scrub") or {}  # docs/verify.md
        e.add("cyclemirror_incoming_scrub_age_seconds", "gauge",
              "Seconds since the last scrub of this image finished.", lb, scrub.get("age"))
        e.add("cyclemirror_incoming_scrub_bad_blocks", "gauge",
              "Blocks the last scrub found differing from their recorded digests.", lb,
              scrub.get("bad_blocks"))
        e.add("cyclemirror_incoming_scrub_rot", "gauge",
              "1 when the last scrub of this image found rot.", lb,
              int(scrub.get("state") == "rot"))
    return e.families.values()


class StatusCollector:
    """Collects ``status_families(status())`` at every scrape (a prometheus-client collector)."""

    def __init__(self, status: Callable[[], dict]):
        self._status = status

    def describe(self):
        return []  # names vary with the store; never call status() at registration

    def collect(self):
        return status_families(self._status())


class CycleHistograms:
    """Histograms of applied cycles, labelled ``volume`` and ``target`` like the status rows.

    ``observe`` is called from the driver's thread once per applied cycle and
    target (for a consistency group, once per member volume: their rows show
    the same cycle).  Thread-safe (prometheus-client's own locking).
    """

    def __init__(self):
        labels = ("volume", "target")
        self.duration = Histogram(
            "cyclemirror_mirror_cycle_duration_seconds",
            "Duration of each applied cycle: its copy, from the first to the last frame sent.",
            labels, registry=None, buckets=DURATION_BUCKETS)
        self.shipped = Histogram(
            "cyclemirror_mirror_cycle_shipped_bytes",
            "Bytes sent on the wire by each applied cycle.",
            labels, registry=None, buckets=BYTES_BUCKETS)
        self.rpo_age = Histogram(
            "cyclemirror_mirror_rpo_age_before_apply_seconds",
            "RPO age reached just before each applied cycle replaced it: now minus the "
            "freeze time of the cycle applied before (the peaks of the RPO age).",
            labels, registry=None, buckets=RPO_BUCKETS)

    def collectors(self) -> tuple[Histogram, ...]:
        return (self.duration, self.shipped, self.rpo_age)

    def observe(self, volumes: Iterable[str], target: str, duration: float | None,
                wire_bytes: int | None, rpo_age_before: float | None) -> None:
        for volume in volumes:
            if duration is not None:
                self.duration.labels(volume, target).observe(max(0.0, duration))
            if wire_bytes is not None:
                self.shipped.labels(volume, target).observe(max(0, wire_bytes))
            if rpo_age_before is not None:
                self.rpo_age.labels(volume, target).observe(max(0.0, rpo_age_before))


def new_registry(status: Callable[[], dict], histograms: CycleHistograms | None = None,
                 process: bool = True) -> CollectorRegistry:
    """A registry with the status figures, the histograms and (``process``) the
    process, platform and garbage-collector collectors."""
    registry = CollectorRegistry()
    registry.register(StatusCollector(status))
    if histograms is not None:
        for collector in histograms.collectors():
            registry.register(collector)
    if process:
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
    return registry


def render_metrics(doc: dict) -> str:
    """The exposition text of one status document's figures alone (no process metrics)."""
    return generate_latest(new_registry(lambda: doc, process=False)).decode()


class MetricsServer:
    """Serves the registry at ``http://HOST:PORT/metrics``; 404 elsewhere."""

    def __init__(self, host: str, port: int, status: Callable[[], dict],
                 histograms: CycleHistograms | None = None):
        registry = new_registry(status, histograms)

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (the name http.server calls)
                if self.path.split("?", 1)[0] != "/metrics":
                    self.send_error(404, "only /metrics is served here")
                    return
                try:
                    body = generate_latest(registry)
                except Exception:
                    log.exception("building metrics failed")
                    self.send_error(500, "building metrics failed; see the daemon log")
                    return
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt, *args):
                log.debug("metrics %s " + fmt, self.client_address[0], *args)

        try:
            self._server = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise UsageError(f"cannot serve metrics on {host}:{port}: {exc.strerror}; "
                             "choose another --metrics address") from None
        self._server.daemon_threads = True
        self.address = self._server.server_address[:2]
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="metrics-http", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
