"""The Grafana dashboard in contrib/ queries only metrics a real daemon serves.

Two real daemons mirror a volume (a rate-capped first copy, so one scrape
catches a cycle running, then small cycles); their scrapes must contain every
metric name the dashboard's PromQL names.  Where Debian's ``prometheus`` is
installed (scripts/install-deps), a real Prometheus scrapes both daemons and
evaluates every expression of the dashboard, which must parse and return data.
Grafana itself is not in Debian: contrib/render-dashboard.py draws the panels
from that Prometheus instead.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from cyclemirror.daemon.nbd_client import NbdClient
from tests.support.daemons import DaemonPool, free_port, make_key, wait_for
from tests.support.metrics import family_of, parse_exposition

DASHBOARD = os.path.join(os.path.dirname(__file__), "..", "contrib", "grafana-dashboard.json")
RENDER = os.path.join(os.path.dirname(__file__), "..", "contrib", "render-dashboard.py")
MiB = 1 << 20
METRIC = re.compile(r"\b((?:cyclemirror|process|python)_[a-z_]+)\b")
# Grafana's variables, as "All" and a rate window of several scrapes
VARIABLES = {"$job": ".*", "$volume": ".*", "$target": ".*", "$__rate_interval": "20s"}


def load_dashboard() -> dict:
    with open(DASHBOARD) as fh:
        return json.load(fh)


def expressions(dashboard: dict) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return exprs


def test_the_dashboard_is_well_formed():
    d = load_dashboard()
    assert d["uid"] == "cyclemirror" and d["panels"]
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in d["templating"]["list"]}
    assert variables == {"datasource", "job", "volume", "target"}
    for p in d["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        if p["type"] == "row":
            continue
        assert p["targets"] and p["datasource"]["uid"] == "${datasource}", p["title"]
        for t in p["targets"]:
            used = set(re.findall(r"\$(\w+)", t["expr"]))
            assert used <= variables | {"__rate_interval"}, (p["title"], used)
            assert METRIC.search(t["expr"]), (p["title"], t["expr"])


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory):
    """A source daemon mirroring a volume to a target daemon; scrapes of both
    taken during a running first copy and after several applied cycles."""
    root = tmp_path_factory.mktemp("dash")
    with DaemonPool(root) as pool:
        key = make_key(root / "mirror.key")
        b = pool.start("b", key_file=key, listen=True, nbd=False)
        a = pool.start("a", key_file=key)
        a.cli("volume", "create", "v", "--size", "16M")
        with NbdClient("v", unix_path=a.nbd_sock) as nbd:
            nbd.write(0, os.urandom(6 * MiB))
            nbd.flush()
        # 6 MiB of random data at 2 MiB/s: the first copy runs for about 3 s
        # an RPO objective, so the objective's metrics are served too
        a.cli("mirror", "start", "v", "--to", b.listen, "--interval", "0.5", "--rpo", "60",
              "--bwlimit", "2M", "--compress", "none")
        scrapes = []

        def running():
            text = a.scrape()
            scrapes.append(text)
            return "cyclemirror_mirror_progress_done_bytes{" in text
        wait_for(running, 30, "a scrape during the running first copy")

        def cycles_applied():
            return {m["target"]: m["cycles_total"] for m in a.status()["mirrors"]}[b.listen] >= 3
        wait_for(cycles_applied, 60, "three applied cycles")
        scrapes += [a.scrape(), b.scrape()]
        yield a, b, scrapes


def served_names(scrapes) -> set[str]:
    names = set()
    for text in scrapes:
        types, samples = parse_exposition(text)
        names |= {n for n, _, _ in samples} | {family_of(n, types) for n, _, _ in samples}
    return names


def test_every_metric_the_dashboard_queries_is_served(mirrored):
    _, _, scrapes = mirrored
    served = served_names(scrapes)
    queried = {m for e in expressions(load_dashboard()) for m in METRIC.findall(e)}
    assert queried, "no metric names found in the dashboard"
    assert queried - served == set(), f"the dashboard queries metrics no daemon serves: " \
        f"{sorted(queried - served)}"
    # what the dashboard is for: these panels are there
    for name in ("cyclemirror_mirror_rpo_age_seconds", "cyclemirror_mirror_cycle_duration_seconds_bucket",
                 "cyclemirror_mirror_shipped_bytes_total", "cyclemirror_mirror_phase",
                 "cyclemirror_mirror_error", "process_cpu_seconds_total",
                 "process_resident_memory_bytes"):
        assert name in queried, name


def prom_query(base: str, expr: str) -> dict:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        body = exc.read()
        try:
            return json.loads(body)  # 400: the expression did not parse
        except ValueError:  # 503 "Service Unavailable" while Prometheus starts
            return {"status": f"HTTP {exc.code}: {body[:200]!r}"}


def render_the_panels(base: str, png) -> None:
    """contrib/render-dashboard.py draws every panel from the same Prometheus
    (matplotlib: the test extra has it) and none of its range queries fails."""
    proc = subprocess.run([sys.executable, RENDER, "--prometheus", base, "--minutes", "2",
                           "--out", str(png)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert png.stat().st_size > 10_000, "the PNG is nearly empty"


def test_prometheus_scrapes_the_daemons_and_runs_every_dashboard_query(mirrored, tmp_path):
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.skip("prometheus is missing (apt-get install prometheus; scripts/install-deps does)")
    a, b, _ = mirrored
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: cyclemirror\n    static_configs:\n"
        f"      - targets: ['{a.metrics}', '{b.metrics}']\n")
    log = open(tmp_path / "prometheus.log", "w")
    proc = subprocess.Popen(
        [prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        def both_up():
            try:
                r = prom_query(base, 'sum(up{job="cyclemirror"})')
            except OSError:
                return False
            return r["status"] == "success" and r["data"]["result"] and \
                float(r["data"]["result"][0]["value"][1]) == 2
        wait_for(both_up, 30, "prometheus to scrape both daemons")
        # rate() needs two samples in its window and the histograms an applied cycle in it
        wait_for(lambda: prom_query(base, 'increase(cyclemirror_mirror_cycles_total[20s]) > 0')
                 .get("data", {}).get("result"), 60, "an applied cycle seen by prometheus")
        time.sleep(2)
        empty = []
        for expr in expressions(load_dashboard()):
            query = expr
            for var, val in VARIABLES.items():
                query = query.replace(var, val)
            if query.startswith("label_values("):  # a Grafana function: its selector
                query = query[len("label_values("):].rsplit(",", 1)[0]
            r = prom_query(base, query)
            assert r["status"] == "success", (expr, r)
            if not r["data"]["result"]:
                empty.append(expr)
        # the only query allowed to be empty: progress, which exists during a cycle only
        assert all("progress" in e for e in empty), empty
        render_the_panels(base, tmp_path / "dashboard.png")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
