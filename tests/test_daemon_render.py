"""Status text, progress bar and Prometheus exposition of a status document.

The metrics text is parsed back with a small strict parser of the exposition
format, so a malformed line (bad escaping, a missing TYPE) fails the test.
"""

import urllib.error
import urllib.request

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cyclemirror.daemon.metrics import CycleHistograms, MetricsServer, render_metrics
from cyclemirror.daemon.render import progress_bar, render_status
from tests.support.metrics import parse_exposition, value

DOC = {
    "schema": 1,
    "time": 1_700_000_100.0,
    "node": {"id": "n-abc", "name": "storage-a", "store": "/srv/store", "version": "0.1.0",
             "listen": "0.0.0.0:7300", "nbd": ["unix:/run/nbd.sock"], "metrics": None},
    "volumes": [{"name": "db", "size": 64 << 20, "block_size": 4096}],
    "mirrors": [
        {"volume": "db", "target": "b:7300", "remote_name": "db", "group": "app",
         "cycle": 7, "applied_cycle": 6, "applied_freeze_time": 1_700_000_098.5,
         "phase": "copying", "rpo_age": 1.5,
         "last_cycle": {"bytes": 1 << 20, "raw_bytes": 3 << 20, "duration": 0.5,
                        "throughput": 2 << 20, "compression_ratio": 3.0},
         "shipped_bytes_total": 10 << 20, "cycles_total": 6,
         "progress": {"done": 16 << 20, "total": 64 << 20, "rate": 8 << 20, "eta": 6.0},
         "last_error": 'connection to "b:7300" lost\nretrying'},
    ],
    "incoming": [
        {"source_node": "n-xyz", "source_name": "storage-c", "volume": "home",
         "image": "/srv/store/mirrors/n-xyz/home.img", "applied_cycle": 3,
         "freeze_time": 1_700_000_000.25, "group": None},
    ],
}

def test_metrics_carry_the_status_figures():
    types, samples = parse_exposition(render_metrics(DOC))
    lb = {"volume": "db", "target": "b:7300"}
    assert value(samples, "cyclemirror_mirror_cycle", **lb) == 7
    assert value(samples, "cyclemirror_mirror_applied_cycle", **lb) == 6
    assert value(samples, "cyclemirror_mirror_rpo_age_seconds", **lb) == 1.5
    assert value(samples, "cyclemirror_mirror_last_cycle_bytes", **lb) == 1 << 20
    assert value(samples, "cyclemirror_mirror_compression_ratio", **lb) == 3.0
    assert value(samples, "cyclemirror_mirror_shipped_bytes_total", **lb) == 10 << 20
    assert value(samples, "cyclemirror_mirror_phase", phase="copying", **lb) == 1
    assert value(samples, "cyclemirror_mirror_phase", phase="idle", **lb) == 0
    assert value(samples, "cyclemirror_mirror_error", **lb) == 1
    assert value(samples, "cyclemirror_incoming_applied_cycle", volume="home") == 3
    assert types["cyclemirror_mirror_shipped_bytes_total"] == "counter"


def test_unknown_figures_are_absent_not_zero():
    doc = {"node": {}, "volumes": [], "incoming": [],
           "mirrors": [{"volume": "v", "target": "t:1", "phase": "copying", "cycle": 1,
                        "rpo_age": None, "last_cycle": None}]}
    _, samples = parse_exposition(render_metrics(doc))
    names = {n for n, _, _ in samples}
    assert "cyclemirror_mirror_rpo_age_seconds" not in names
    assert "cyclemirror_mirror_last_cycle_bytes" not in names


@given(st.text(min_size=1, max_size=30))
def test_any_label_text_is_escaped_into_a_valid_line(name):
    doc = {"node": {"id": name}, "volumes": [], "incoming": [],
           "mirrors": [{"volume": name, "target": name, "phase": "idle"}]}
    parse_exposition(render_metrics(doc))


def test_status_table_shows_every_figure_and_the_progress_line():
    text = render_status(DOC)
    for fragment in ["storage-a", "db", "b:7300", "app", "copying", "1.50s", "1.0 MiB",
                     "0.50s", "2.0 MiB/s", "3.00x", "connection to", "25.0%", "ETA 6.00s",
                     "/srv/store/mirrors/n-xyz/home.img", "storage-c",
                     "2023-11-14 22:13:20.250Z"]:
        assert fragment in text, fragment
    bar_line = next(line for line in text.splitlines() if "ETA" in line)
    assert "[#######......................." in bar_line


@given(st.integers(0, 10**12), st.integers(1, 10**12))
def test_progress_bar_is_fixed_width_and_monotone(done, total):
    done = min(done, total)
    bar = progress_bar(done, total)
    assert len(bar) == 32
    assert bar.count("#") <= progress_bar(min(total, done + total // 10), total).count("#")


def test_metrics_server_serves_metrics_and_404s_elsewhere():
    histograms = CycleHistograms()
    fed = (0.3, 12.0)  # cycle durations given to the histogram: figures, nothing is timed
    histograms.observe(["db"], "b:7300", duration=fed[0], wire_bytes=5000, rpo_age_before=31.0)
    histograms.observe(["db"], "b:7300", duration=fed[1], wire_bytes=3 << 30,
                       rpo_age_before=None)
    server = MetricsServer("127.0.0.1", 0, lambda: DOC, histograms)
    server.start()
    try:
        host, port = server.address
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as resp:
            assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            types, samples = parse_exposition(resp.read().decode())
        lb = {"volume": "db", "target": "b:7300"}
        # the status figures, as render_metrics gives them
        assert value(samples, "cyclemirror_mirror_cycle", **lb) == 7
        # the histograms: counts, sums and cumulative buckets of the durations in ``fed``:
        # the exposition's arithmetic over given figures, nothing here is timed
        assert types["cyclemirror_mirror_cycle_duration_seconds"] == "histogram"
        assert value(samples, "cyclemirror_mirror_cycle_duration_seconds_count", **lb) == len(fed)
        assert value(samples, "cyclemirror_mirror_cycle_duration_seconds_sum", **lb) == sum(fed)
        assert value(samples, "cyclemirror_mirror_cycle_duration_seconds_bucket",
                     le="0.5", **lb) == 1
        assert value(samples, "cyclemirror_mirror_cycle_shipped_bytes_sum", **lb) == 5000 + (3 << 30)
        assert value(samples, "cyclemirror_mirror_cycle_shipped_bytes_bucket",
                     le="+Inf", **lb) == 2
        assert value(samples, "cyclemirror_mirror_rpo_age_before_apply_seconds_count", **lb) == 1
        assert value(samples, "cyclemirror_mirror_rpo_age_before_apply_seconds_bucket",
                     le="30.0", **lb) == 0
        assert value(samples, "cyclemirror_mirror_rpo_age_before_apply_seconds_bucket",
                     le="45.0", **lb) == 1
        # what prometheus-client brings: this process's CPU, memory and files
        assert value(samples, "process_cpu_seconds_total") > 0
        assert value(samples, "process_resident_memory_bytes") > 1 << 20
        assert value(samples, "process_open_fds") >= 3
        assert types["process_cpu_seconds_total"] == "counter"
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"http://{host}:{port}/other", timeout=10)
        assert info.value.code == 404
    finally:
        server.close()


maybe_num = st.one_of(st.none(), st.floats(0, 1e12, allow_nan=False), st.integers(0, 1 << 50))
rows = st.fixed_dictionaries({
    "volume": st.text(min_size=1, max_size=12), "target": st.text(min_size=1, max_size=20),
    "phase": st.sampled_from(["freezing", "copying", "applying", "idle", "broken",
                              "reconnecting"]),
    "cycle": st.integers(0, 10**9), "applied_cycle": st.integers(0, 10**9),
    "rpo_age": maybe_num, "last_error": st.one_of(st.none(), st.text(max_size=300)),
    "last_cycle": st.one_of(st.none(), st.fixed_dictionaries({
        "bytes": st.integers(0, 1 << 50), "duration": maybe_num, "throughput": maybe_num,
        "compression_ratio": maybe_num})),
    "progress": st.one_of(st.none(), st.fixed_dictionaries({
        "done": st.integers(0, 1 << 40), "total": st.integers(0, 1 << 40), "rate": maybe_num,
        "eta": maybe_num})),
})


@given(st.lists(rows, max_size=4))
def test_status_text_and_metrics_render_any_schema_conforming_document(mirror_rows):
    doc = dict(DOC, mirrors=mirror_rows)
    text = render_status(doc)
    assert text.endswith("\n")
    parse_exposition(render_metrics(doc))


def test_status_table_lists_file_objects_with_their_consistency():
    doc = dict(DOC, files=[
        {"name": "vm", "kind": "file", "path": "/srv/images/vm.img", "size": 4 << 30,
         "block_size": 4096, "fs": "xfs", "consistency": "per-file", "snapshots": "/x",
         "frozen_cycle": 7},
        {"name": "bad", "kind": "file", "error": "its record is damaged"}])
    text = render_status(doc)
    row = next(line for line in text.splitlines() if line.startswith("vm "))
    for fragment in ["/srv/images/vm.img", "xfs", "4.0 GiB", "per-file", "7"]:
        assert fragment in row, fragment
    assert "error: its record is damaged" in text


def _mirror_row(**kw) -> dict:
    row = {"volume": "db", "target": "b:7300", "phase": "idle", "cycle": 1}
    row.update(kw)
    return row


def _codec_cell(row: dict) -> str:
    """The CODEC cell of the one mirror row, found under its header."""
    lines = render_status({"node": {}, "volumes": [], "mirrors": [row]}).splitlines()
    (head,) = [line for line in lines if line.startswith("VOLUME  TARGET")]
    body = lines[lines.index(head) + 1]
    start, end = head.index("CODEC"), head.index("RATIO")
    return body[start:end].strip()


@pytest.mark.parametrize("row, cell", [
    (_mirror_row(compress="auto", compress_auto={"codec": "lz4", "link_rate": 1e9,
                                                 "candidates": []}), "lz4 (auto)"),
    (_mirror_row(compress="auto", compress_auto={"codec": "zstd:3", "link_rate": None,
                                                 "candidates": []}), "zstd:3 (auto)"),
    (_mirror_row(compress="auto", compress_auto={"codec": "none", "link_rate": 9e9,
                                                 "candidates": []}), "none (auto)"),
    (_mirror_row(compress="auto", compress_auto=None), "auto"),  # nothing packed yet
    (_mirror_row(compress="zstd:3", compress_auto=None), "zstd:3"),
    (_mirror_row(compress="none"), "none"),
    (_mirror_row(), "-"),  # an old daemon's document without the field
])
def test_the_codec_column_shows_auto_s_current_pick(row, cell):
    assert _codec_cell(row) == cell


def test_an_rbd_image_row_says_how_many_cycle_snapshots_it_keeps():
    row = {"source_node": "n1", "volume": "v", "applied_cycle": 7,
           "image": "rbd:pool/n1~v@cyclemirror-7", "keep_cycles": 3}
    text = render_status({"node": {}, "volumes": [], "incoming": [row]})
    assert "rbd:pool/n1~v@cyclemirror-7 (keeps 3 cycles)" in text
    row["keep_cycles"] = 1
    text = render_status({"node": {}, "volumes": [], "incoming": [row]})
    assert "@cyclemirror-7 (keeps 1 cycle)" in text
    del row["keep_cycles"]  # a file image: no such figure
    text = render_status({"node": {}, "volumes": [], "incoming": [row]})
    assert "rbd:pool/n1~v@cyclemirror-7" in text and "keeps" not in text


def test_tree_mirrors_show_their_kind_and_applied_cycle_on_both_sides():
    doc = {"node": {}, "volumes": [],
           "mirrors": [_mirror_row(volume="app", kind="tree", cycle=5, applied_cycle=4,
                                   phase="copying")],
           "incoming_trees": [{"source_node": "n1", "tree": "app", "applied_cycle": 4,
                               "freeze_time": 1795689198.1, "rpo_age": 2.5,
                               "path": "/s/mirrors/n1/trees/app", "error": None}]}
    lines = render_status(doc).splitlines()
    row = next(line for line in lines if line.startswith("app (tree)"))
    assert "5, applied 4" in row and "copying" in row
    (head,) = [line for line in lines if line.startswith("FROM NODE") and "TREE" in line]
    body = lines[lines.index(head) + 1]
    assert body.split()[:3] == ["n1", "app", "4"] and "/s/mirrors/n1/trees/app" in body
