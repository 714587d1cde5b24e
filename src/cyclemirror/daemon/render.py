"""Turns the status document (docs/cli.md, "status --json") into text for a terminal.

Pure functions, no I/O: the CLI prints what they return, the demo too, and
the tests feed them hand-written documents.  A mirror whose copy has a known
total and is not done gets a progress line (bar, percent, rate, time left),
which is what a long first cycle looks like in ``status --watch``.
"""

from __future__ import annotations

import time

from cyclemirror.units import format_duration, format_rate, format_size

BAR_WIDTH = 30
CLEAR_SCREEN = "\x1b[H\x1b[2J"


def progress_bar(done: int, total: int, width: int = BAR_WIDTH) -> str:
    if total <= 0:
        return "[" + "-" * width + "]"
    filled = min(width, max(0, done * width // total))
    return "[" + "#" * filled + "." * (width - filled) + "]"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip()
            for row in rows]


def _ratio(value) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _codec_cell(m: dict) -> str:
    """The mirror's codec; with ``--compress auto`` its current pick: "lz4 (auto)"."""
    auto = m.get("compress_auto")
    if m.get("compress") == "auto" or auto:
        return f"{auto['codec']} (auto)" if auto and auto.get("codec") else "auto"
    return m.get("compress") or "-"


def _freeze_clock(ts) -> str:
    if ts is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) + f".{int(ts * 1000) % 1000:03d}Z"


def _image_cell(m: dict) -> str:
    """Where an incoming image is; an RBD image also says how many cycle snapshots it
    keeps (``--keep-cycles``, docs/ceph.md)."""
    image = m.get("image") or f"unreadable: {m.get('error')}"
    keep = m.get("keep_cycles")
    if isinstance(keep, int) and not isinstance(keep, bool) and m.get("image"):
        image += f" (keeps {keep} cycle{'s' if keep != 1 else ''})"
    return image


def _check_cell(check: dict | None) -> str:
    """A verify's or scrub's state and age for a table cell: ``clean 3m05s ago``."""
    if not check or check.get("state") in (None, "never"):
        return "never"
    state = check["state"]
    if state == "running" and check.get("running"):
        run = check["running"]
        pct = 100.0 * run["done"] / run["total"] if run.get("total") else 0.0
        return f"running {pct:.0f}%"
    age = check.get("age")
    return state.upper() if state in ("mismatch", "rot") else (
        f"{state} {format_duration(age)} ago" if age is not None else state)


def render_progress(progress: dict) -> str:
    done, total = progress.get("done", 0), progress.get("total", 0)
    percent = 100.0 * done / total if total else 0.0
    return (f"{progress_bar(done, total)} {percent:5.1f}%  {format_size(done)} of "
            f"{format_size(total)}  {format_rate(progress.get('rate'))}  "
            f"ETA {format_duration(progress.get('eta'))}")


def _extent_lines(result: dict, what: str) -> list[str]:
    lines = [f"    offset {e['offset']}  length {e['length']}" for e in result.get("extents", [])]
    if result.get("extents_truncated"):
        lines.append(f"    ... (the first {len(result['extents'])} extents of the {what} "
                     "are listed; --json has the same list)")
    return lines


def render_verify(r: dict) -> str:
    """One target's ``mirror verify`` result as text."""
    head = f"{r['volume']} -> {r['target']}"
    cycles = r.get("cycles") or []
    at = (f"cycle {cycles[0]}" if len(set(cycles)) == 1 else
          f"cycles {cycles[0]}..{cycles[1]}") if cycles else "no cycle"
    span = (f"{format_size(r['length'])} from offset {r['offset']}"
            if r["offset"] or r.get("resumed_from") else format_size(r["length"]))
    resumed = (f", resumed after {format_size(r['resumed_from'])}"
               if r.get("resumed_from") else "")
    figures = (f"{span} compared at {at} in {format_duration(r.get('duration'))}{resumed}, "
               f"{format_size(r.get('wire_bytes', 0))} on the wire")
    if not r["mismatched_blocks"]:
        return f"{head}: clean: {figures}\n"
    lines = [f"{head}: {r['mismatched_blocks']} blocks differ "
             f"({format_size(r['mismatched_bytes'])}): {figures}"]
    lines += _extent_lines(r, "differences")
    rep = r.get("repair")
    if r["state"] == "repaired" and rep:
        lines.append(f"  repaired: {rep['blocks']} blocks shipped in cycle "
                     f"{rep.get('applied_cycle') or rep.get('cycle')} "
                     f"({rep.get('raw_bytes')} raw bytes, {rep.get('wire_bytes')} bytes on the "
                     "wire for that cycle), held by the target")
    elif rep:
        when = (f"cycle {rep['cycle']}" if rep.get("cycle") is not None
                else "the first cycle after 'cyclemirror mirror resume'")
        lines.append(f"  repair pending: {rep['blocks']} blocks are owed to the target and "
                     f"ship in {when}; 'status' shows when it is done")
    else:
        lines.append(f"  NOT repaired: run 'cyclemirror mirror verify {r['volume']} --to "
                     f"{r['target']} --repair'")
    return "\n".join(lines) + "\n"


def render_scrub(r: dict) -> str:
    """A ``mirror scrub`` result as text."""
    head = f"{r.get('source_name') or r['source_node']}/{r['volume']}"
    cycles = r.get("cycles") or []
    at = (f"cycle {cycles[0]}" if len(set(cycles)) == 1 else
          f"cycles {cycles[0]}..{cycles[1]}") if cycles else "no cycle"
    figures = (f"{r['checked_blocks']} blocks checked at {at} in "
               f"{format_duration(r.get('duration'))}")
    if r.get("unchecked_blocks"):
        figures += (f"; {r['unchecked_blocks']} had no recorded digest yet (recorded now, "
                    "checked from the next scrub on)")
    if r.get("damaged_pages"):
        figures += f"; {r['damaged_pages']} damaged record pages rewritten"
    if not r["bad_blocks"]:
        return f"{head}: clean: {figures}\n"
    lines = [f"{head}: ROT: {r['bad_blocks']} blocks differ from the digests recorded when "
             f"they were applied ({figures})"]
    lines += _extent_lines(r, "rot")
    lines.append("  the target cannot repair them itself: on the source run 'cyclemirror "
                 f"mirror verify {r['volume']} --repair'")
    return "\n".join(lines) + "\n"


def _alarms(doc: dict) -> list[str]:
    """Loud lines for a mismatch found and not repaired, and for rot found by a scrub."""
    out = []
    for m in doc.get("mirrors", []):
        v = m.get("verify") or {}
        if v.get("state") in ("mismatch", "repairing"):
            verb = ("NOT REPAIRED: run 'cyclemirror mirror verify "
                    f"{m['volume']} --to {m['target']} --repair'"
                    if v["state"] == "mismatch" else "repair pending")
            out.append(f"!! {m['volume']} -> {m['target']}: the last verify found "
                       f"{v.get('mismatched_blocks')} differing blocks; {verb}")
    for m in doc.get("incoming", []):
        s = m.get("scrub") or {}
        if s.get("state") == "rot":
            out.append(f"!! {m.get('source_name') or m.get('source_node')}/{m['volume']}: the "
                       f"last scrub found {s.get('bad_blocks')} rotten blocks; verify with "
                       "--repair from the source")
    return out


def render_status(doc: dict) -> str:
    node = doc.get("node", {})
    lines = [f"node {node.get('name') or '-'} ({node.get('id', '?')})  store {node.get('store')}"]
    serving = []
    if node.get("listen"):
        serving.append(f"mirrors in on {node['listen']}")
    for endpoint in node.get("nbd") or []:
        serving.append(f"nbd {endpoint}")
    if node.get("metrics"):
        serving.append(f"metrics http://{node['metrics']}/metrics")
    if serving:
        lines.append("  " + ", ".join(serving))
    volumes = doc.get("volumes", [])
    lines.append("")
    if volumes:
        rows = [["VOLUME", "SIZE", "BLOCK"]]
        rows += [[v["name"], format_size(v["size"]), str(v["block_size"])] for v in volumes]
        lines += _table(rows)
    else:
        lines.append("no volumes")
    files = doc.get("files") or []
    if files:  # file objects (docs/files.md)
        lines.append("")
        rows = [["FILE", "PATH", "FS", "SIZE", "CONSISTENCY", "FROZEN CYCLE"]]
        rows += [[f["name"], f"error: {f['error']}", "", "", "", ""] if "error" in f else
                 [f["name"], f["path"], f["fs"], format_size(f["size"]), f["consistency"],
                  str(f["frozen_cycle"])] for f in files]
        lines += _table(rows)
    trees = doc.get("trees") or []
    if trees:  # tree objects (docs/trees.md)
        lines.append("")
        rows = [["TREE", "PATH", "FS", "CONSISTENCY", "FROZEN CYCLE"]]
        rows += [[t["name"], f"error: {t['error']}", "", "", ""] if "error" in t else
                 [t["name"], t["path"], t["fs"], t["consistency"], str(t["frozen_cycle"])]
                 for t in trees]
        lines += _table(rows)
        for t in trees:  # a demoted tree stops cycling until it is failed back
            if t.get("demoted"):
                lines.append(f"tree {t['name']} is DEMOTED (by {t['demoted']['by']}): stop "
                             "its writers and fail back from the new primary "
                             "(docs/trees.md)")
    mirrors = doc.get("mirrors", [])
    if mirrors:
        lines.append("")
        rows = [["VOLUME", "TARGET", "GROUP", "CYCLE", "PHASE", "RPO AGE", "LAST BYTES",
                 "LAST TIME", "RATE", "CODEC", "RATIO", "VERIFIED", "LAST ERROR"]]
        progress_after = {}
        for m in mirrors:
            last = m.get("last_cycle") or {}
            name = (m["volume"] if m.get("remote_name") in (None, m["volume"])
                    else f"{m['volume']} as {m['remote_name']}")
            if m.get("kind") in ("file", "tree"):  # a file or tree object (docs/trees.md)
                name += f" ({m['kind']})"
            cycle = str(m.get("cycle", 0))
            if m.get("applied_cycle") is not None and m["applied_cycle"] != m.get("cycle", 0):
                cycle += f", applied {m['applied_cycle']}"
            rows.append([
                name, m["target"], m.get("group") or "-", cycle, m.get("phase", "?"),
                _rpo_cell(m),
                format_size(last["bytes"]) if "bytes" in last else "-",
                format_duration(last.get("duration")),
                format_rate(last.get("throughput")),
                _codec_cell(m),
                _ratio(last.get("compression_ratio")),
                _check_cell(m.get("verify")),
                (m.get("last_error") or "-")[:80],
            ])
            if m.get("progress"):
                progress_after[len(rows) - 1] = render_progress(m["progress"])
        for index, line in enumerate(_table(rows)):
            lines.append(line)
            if index in progress_after:
                lines.append("    " + progress_after[index])
    incoming = doc.get("incoming", [])
    if incoming:
        lines.append("")
        rows = [["FROM NODE", "VOLUME", "GROUP", "APPLIED", "FREEZE TIME (UTC)", "RPO AGE",
                 "RECEIVING", "SCRUBBED", "IMAGE"]]
        for m in incoming:
            source = m.get("source_name") or m.get("source_node", "?")
            receiving = m.get("receiving")
            rows.append([source, m["volume"], m.get("group") or "-",
                         str(m.get("applied_cycle", 0)), _freeze_clock(m.get("freeze_time")),
                         format_duration(m.get("rpo_age")),
                         f"cycle {receiving['cycle']}, {receiving['chunks']} chunks"
                         if receiving else "-", _check_cell(m.get("scrub")),
                         _image_cell(m)])
        lines += _table(rows)
    trees_in = doc.get("incoming_trees") or []
    if trees_in:  # tree mirrors held here (docs/trees.md)
        lines.append("")
        rows = [["FROM NODE", "TREE", "APPLIED", "FREEZE TIME (UTC)", "RPO AGE", "PATH"]]
        rows += [[m.get("source_name") or m.get("source_node", "?"), m["tree"],
                  str(m.get("applied_cycle", 0)), _freeze_clock(m.get("freeze_time")),
                  format_duration(m.get("rpo_age")),
                  (m["path"] if not m.get("error") else f"unreadable: {m['error']}")
                  + (f" (failed back; kept: {m['failback']['kept']})"
                     if m.get("failback") else "")
                  + (f" (split brain lost by the promoted tree; kept: "
                     f"{m['discarded']['kept']})" if m.get("discarded") else "")]
                 for m in trees_in]
        lines += _table(rows)
    roles_lines = render_roles(doc)  # roles and generations (docs/failover.md)
    if roles_lines:
        lines.append("")
        lines += roles_lines
    alarms = _alarms(doc)
    if alarms:
        lines.append("")
        lines += alarms
    recent = doc.get("incoming_errors") or []
    if recent:
        lines.append("")
        lines.append("recent errors of incoming sessions (newest last):")
        lines += [f"  {text[:160]}" for text in recent[-5:]]
    return "\n".join(lines) + "\n"


def render_roles(doc: dict) -> list[str]:
    """The ROLES table: each volume's role and generation, the last common cycle per peer."""
    rows = [["VOLUME", "ROLE", "GENERATION", "PEER", "COMMON GENERATION", "NOTE"]]
    for r in doc.get("roles") or []:
        if r.get("error"):
            rows.append(["?", "?", "-", "-", "-", f"unreadable: {r['error']}"[:120]])
            continue
        note = "-"
        if r.get("demoted"):
            note = f"demoted by {r['demoted']['by']}: {r['demoted']['message']}"[:120]
        elif r.get("promoted_from"):
            p = r["promoted_from"]
            note = ("promoted" + (" (forced)" if p["forced"] else "") + f" from cycle "
                    f"{p['cycle']} of {p['source_name'] or p['source_node']}")
        peers = r.get("peers") or [{}]
        for i, peer in enumerate(peers):
            rows.append([r["volume"] if i == 0 else "", r["role"] if i == 0 else "",
                         (r.get("generation") or "-") if i == 0 else "",
                         peer.get("peer") or "-", peer.get("common_generation") or "-",
                         note if i == 0 else ""])
        for kept in r.get("kept") or []:
            rows.append(["", "", "", "", "", f"kept: {kept['path']} ({kept['bytes']} bytes)"])
    for m in doc.get("incoming") or []:
        if m.get("generation"):
            rows.append([m["volume"], "secondary", m["generation"],
                         m.get("source_name") or m.get("source_node", "?"), m["generation"],
                         "-"])
    return _table(rows) if len(rows) > 1 else []


def _rpo_cell(m: dict) -> str:
    """The RPO age, and against an objective its state: "1.2s (ok, objective 2s)", with
    "writers paced to 80.0 MiB/s" while --pace holds the volume's writers."""
    age = format_duration(m.get("rpo_age"))
    rpo = m.get("rpo")
    if not rpo:
        return age
    limit = (m.get("pacing") or {}).get("limit")
    paced = f", writers paced to {format_rate(limit)}" if limit else ""
    return f"{age} ({rpo['state'].replace('_', ' ')}, objective {rpo['objective']:g}s{paced})"


CHECK_CODES = {"ok": 0, "at_risk": 1, "violated": 2}


def check_status(doc: dict) -> tuple[int, str]:
    """``status --check``: (exit code, one line) for monitoring systems.

    Each outgoing mirror row counts as its RPO state (``rpo.state``), a broken
    mirror as violated whether or not it has an objective; mirrors without an
    objective are otherwise ok.  The line names the worst row and why.
    """
    rows = doc.get("mirrors", [])
    judged = []
    for m in rows:
        rpo = m.get("rpo") or {}
        if m.get("phase") == "broken":
            state, why = "violated", f"broken: {m.get('last_error') or 'see status'}"
        elif rpo.get("state") in CHECK_CODES:
            state, why = rpo["state"], rpo.get("reason", "")
        else:
            state, why = "ok", ""
        limit = (m.get("pacing") or {}).get("limit")
        if limit:  # the application pays for the objective: say so
            why += f"; writers paced to {format_rate(limit)}"
        judged.append((CHECK_CODES[state], state, f"{m['volume']} -> {m['target']}", why))
    if not judged:
        return 0, "OK: no outgoing mirrors"
    code, state, what, why = max(judged, key=lambda j: j[0])
    others = sum(1 for j in judged if j[0] == code) - 1
    more = f" (and {others} more)" if others else ""
    if code == 0:
        with_objective = sum(1 for m in rows if m.get("rpo"))
        paced = len({m["volume"] for m in rows if (m.get("pacing") or {}).get("limit")})
        return 0, (f"OK: {len(rows)} mirror(s), {with_objective} with an RPO objective, "
                   "all within it" + (f"; writers of {paced} volume(s) paced" if paced else ""))
    return code, f"{state.upper().replace('_', ' ')}: {what}: {why}{more}"
