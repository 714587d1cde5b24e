"""Prometheus text exposition of the status document, and the HTTP endpoint serving it.

The metrics are the same figures ``cyclemirror status --json`` shows, one
gauge or counter per field, labelled by volume and target (outgoing) or by
source node and volume (incoming); the names are listed in
docs/operations.md.  ``render_metrics`` is pure; ``MetricsServer`` is a
threading HTTP server (one thread per scrape) that calls a status provider on
every GET of ``/metrics`` and answers 404 for any other path.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cyclemirror.errors import UsageError

PHASES = ("freezing", "copying", "applying", "idle", "broken", "reconnecting")
RPO_STATES = ("ok", "at_risk", "violated")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

log = logging.getLogger("cyclemirror.daemon.metrics")


def _escape(value) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**labels) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def _number(value) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    return repr(float(value))


class _Exposition:
    def __init__(self):
        self.families: dict[str, tuple[str, str, list[str]]] = {}

    def add(self, name: str, kind: str, help_text: str, labels: dict, value) -> None:
        if value is None:
            return  # unknown yet (no applied cycle): absent, never a fake 0
        family = self.families.setdefault(name, (kind, help_text, []))
        family[2].append(f"{name}{_labels(**labels) if labels else ''} {_number(value)}")

    def text(self) -> str:
        out = []
        for name, (kind, help_text, samples) in self.families.items():
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(samples)
        return "\n".join(out) + "\n"


def render_metrics(doc: dict) -> str:
    e = _Exposition()
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
              "Duration of the last completed cycle, freeze to applied.", lb,
              last.get("duration"))
        e.add("cyclemirror_mirror_throughput_bytes_per_second", "gauge",
              "Wire bytes per second of the last completed cycle.", lb, last.get("throughput"))
        e.add("cyclemirror_mirror_compression_ratio", "gauge",
              "Raw bytes over wire bytes of the last completed cycle.", lb,
              last.get("compression_ratio"))
        e.add("cyclemirror_mirror_shipped_bytes_total", "counter",
              "Bytes sent on the wire to this target since the daemon started.", lb,
              m.get("shipped_bytes_total", 0))
        e.add("cyclemirror_mirror_cycles_total", "counter",
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
        for phase, seconds in ((last.get("phases") or {}).items()):
            e.add("cyclemirror_mirror_last_cycle_phase_seconds", "gauge",
                  "Seconds the last completed cycle spent in each phase (wait, freeze, pack, "
                  "send, commit, apply, merge).", dict(lb, phase=phase), seconds)
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
    return e.text()


class MetricsServer:
    """Serves ``render_metrics(status())`` at ``http://HOST:PORT/metrics``."""

    def __init__(self, host: str, port: int, status: Callable[[], dict]):
        provider = status

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (the name http.server calls)
                if self.path.split("?", 1)[0] != "/metrics":
                    self.send_error(404, "only /metrics is served here")
                    return
                try:
                    body = render_metrics(provider()).encode()
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
