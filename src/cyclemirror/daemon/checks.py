"""Verify and scrub in the daemon: on request or on a schedule, recorded, resumable, in status.

``Checks`` runs ``sender.verify.VerifyRun`` for an outgoing mirror (control op
``mirror.verify``) and ``receiver.scrub.scrub_image`` for an incoming image
(``mirror.scrub``), and a scheduler thread runs both every ``verify_every`` /
``scrub_every`` seconds from the config (docs/verify.md, "In the daemon").

Records (JSON, replaced atomically), so a restart loses nothing:

* verify: ``STORE/outgoing/<mirror state dir>/verify-<volume>@<target>.json``
  and the blocks found so far in ``....bitmap`` beside it;
* scrub: ``<volume>.scrub.json`` beside the mirror image.

Each holds ``run`` (the latest run: its span, how far it got, running / done /
failed, the error) and ``last`` (the result of the latest run that finished).
A run that finds a record of the same span that did not finish starts where
that one stopped (``--restart`` starts over); the scheduler resumes such a run
at once after a restart.  ``annotate`` adds each mirror's ``verify`` and each
incoming image's ``scrub`` summary to the status document; a mismatch found
and not repaired (or rot found) is a state of its own there, loud in the
text status and in the metrics.

Concurrency: one run per mirror and target (or per image) at a time
(``_running``, under ``_lock``); the scheduler runs its jobs one after another
in its own thread; a control request runs in its control connection's thread.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from types import SimpleNamespace

from cyclemirror._cext.bitmap import ExtentBitmap
from cyclemirror.errors import (
    BitmapError,
    CycleGoneError,
    CycleMirrorError,
    NotFoundError,
    UsageError,
)
from cyclemirror.fileio import atomic_write

log = logging.getLogger("cyclemirror.checks")

FORMAT = 1
MAX_EXTENTS = 1000  # extents listed in a result (the count is always exact)
MAX_RUNS_KEPT = 100_000  # a scrub's bad runs kept for a resume
CYCLE_GONE_WAIT = 120.0  # seconds a verify waits for a lagging target to catch up
REPAIR_WAIT = 600.0  # seconds a verify --repair waits for the repair cycle to apply
RETRY_FAILED = 600.0  # a scheduled run that failed is tried again after this (at most)
TICK = 5.0
_SAFE = re.compile(r"[^A-Za-z0-9_.@-]")


def _write_json(path: str, body: dict) -> None:
    atomic_write(path, (json.dumps(body, indent=1, sort_keys=True) + "\n").encode())


def _read_json(path: str) -> dict | None:
    try:
        with open(path, "rb") as fh:
            body = json.load(fh)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("check record %s unreadable (%s); starting afresh", path, exc)
        return None
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        return None
    return body


def _held(target_status: dict) -> int:
    """The newest cycle a target holds durably (committed, or applied)."""
    return max(target_status.get("committed_cycle") or 0,
               target_status.get("applied_cycle") or 0)


def extents_of(bitmap: ExtentBitmap, block_size: int) -> tuple[list[dict], bool]:
    """Byte extents of the set blocks, at most MAX_EXTENTS, and whether there were more."""
    out = []
    for start, count in bitmap.iter_runs():
        if len(out) == MAX_EXTENTS:
            return out, True
        out.append({"offset": start * block_size, "length": count * block_size})
    return out, False


class Checks:
    def __init__(self, store, outgoing, config):
        self.store = store
        self.outgoing = outgoing
        self.config = config
        self._lock = threading.Lock()
        self._running: dict[tuple, dict] = {}  # key -> {"done", "total", "started"}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- life cycle ---------------------------------------------------------------------
    def start(self) -> None:
        if self.config.verify_every or self.config.scrub_every:
            self._thread = threading.Thread(target=self._schedule, daemon=True,
                                            name="checks-schedule")
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)

    def _claim(self, key: tuple, total: int) -> dict:
        with self._lock:
            if key in self._running:
                what = f"{key[1]} -> {key[2]}" if key[0] == "verify" else f"{key[1]}/{key[2]}"
                raise UsageError(f"a {key[0]} of {what} is already running (started at "
                                 f"{time.ctime(self._running[key]['started'])}); wait for it")
            job = {"done": 0, "total": total, "started": time.time(), "cancel": self._stop}
            self._running[key] = job
            return job

    def _release(self, key: tuple) -> None:
        with self._lock:
            self._running.pop(key, None)

    # -- verify -------------------------------------------------------------------------
    def _verify_paths(self, driver, volume: str, label: str) -> tuple[str, str]:
        base = os.path.join(driver.state.directory,
                            "verify-" + _SAFE.sub("_", f"{volume}@{label}"))
        return base + ".json", base + ".bitmap"

    def verify(self, volume: str, target: str | None = None, *, repair: bool = False,
               offset: int = 0, length: int = 0, bwlimit: int = 0, restart: bool = False,
               repair_wait: float = REPAIR_WAIT) -> list[dict]:
        """Verify the volume's image on each of its targets (or ``target``); a result each."""
        driver, index, runs = self.outgoing.check_subject(volume, target)
        return [self._verify_one(driver, index, volume, label, run, repair=repair,
                                 offset=offset, length=length, bwlimit=bwlimit,
                                 restart=restart, repair_wait=repair_wait)
                for label, run in runs]

    def _verify_one(self, driver, index, volume, label, run, *, repair, offset, length,
                    bwlimit, restart, repair_wait) -> dict:
        from cyclemirror.sender.verify import VerifyRun

        vol = driver.subject.volumes[index]
        if length == 0:
            length = vol.size - offset if 0 <= offset < vol.size else 0
        key = ("verify", volume, label)
        job = self._claim(key, length)
        json_path, bitmap_path = self._verify_paths(driver, volume, label)
        record = None
        try:
            record = _read_json(json_path) or {"format": FORMAT, "volume": volume,
                                               "target": label, "run": None, "last": None}
            prev = record.get("run") or {}
            resume_from, found = None, None
            if (not restart and prev.get("status") in ("running", "failed")
                    and (prev.get("offset"), prev.get("length")) == (offset, length)):
                try:
                    found = ExtentBitmap.load(bitmap_path)
                    resume_from = int(prev["next_offset"])
                except (BitmapError, OSError, KeyError, ValueError, TypeError) as exc:
                    log.warning("verify of %s -> %s: cannot resume (%s); starting over",
                                volume, label, exc)
                    resume_from, found = None, None
            started = time.time()
            record["run"] = {"status": "running", "offset": offset, "length": length,
                             "next_offset": offset if resume_from is None else resume_from,
                             "started": started, "updated": started, "error": None,
                             "repair": repair}
            _write_json(json_path, record)
            saved_count = [-1]

            def progress(done: int, found_now: ExtentBitmap, outcome) -> None:
                n = found_now.count()
                if n != saved_count[0]:
                    found_now.save(bitmap_path)  # before the offset that relies on it
                    saved_count[0] = n
                record["run"].update(next_offset=done, updated=time.time())
                _write_json(json_path, record)
                job["done"] = done - offset  # status shows what a restart would resume from

            deadline = time.monotonic() + CYCLE_GONE_WAIT
            while True:
                verifier = VerifyRun(
                    driver.subject, index, self.store, run.spec, offset=offset, length=length,
                    read_rate=bwlimit, resume_from=resume_from, found=found,
                    expect_node=getattr(driver.state.targets.get(run.label), "target_node",
                                        None),
                    on_progress=progress, cancel=self._stop, merges=driver)
                try:
                    outcome = verifier.run()
                    break
                except CycleGoneError as exc:
                    if time.monotonic() > deadline:
                        raise
                    log.info("verify of %s -> %s waits: %s", volume, label, exc)
                    self._stop.wait(1.0)
        except BaseException as exc:
            if record is not None and record.get("run"):
                record["run"].update(status="failed", updated=time.time(),
                                     error=f"{type(exc).__name__}: {exc}")
                try:
                    _write_json(json_path, record)
                except OSError:
                    pass
            log.warning("verify of %s -> %s failed: %s: %s", volume, label,
                        type(exc).__name__, exc)
            self._release(key)
            raise
        try:
            result = self._verify_result(driver, index, volume, label, run, outcome, repair,
                                         repair_wait, record)
        finally:
            self._release(key)
        return result

    def _verify_result(self, driver, index, volume, label, run, outcome, repair, repair_wait,
                       record) -> dict:
        bs = outcome.block_size
        extents, truncated = extents_of(outcome.mismatched, bs)
        n = outcome.mismatched.count()
        result = {
            "volume": volume, "target": label, "remote_name": driver.subject.remote_names[index],
            "state": "clean" if n == 0 else "mismatch",
            "offset": outcome.offset, "length": outcome.length,
            "resumed_from": outcome.resumed_from, "cycles": outcome.cycles,
            "mismatched_blocks": n, "mismatched_bytes": n * bs, "block_size": bs,
            "extents": extents, "extents_truncated": truncated,
            "source_read_bytes": outcome.source_bytes_read,
            "wire_bytes": outcome.wire_sent + outcome.wire_received,
            "duration": outcome.duration, "started": record["run"]["started"],
            "finished": time.time(), "repair": None,
        }
        if n:
            log.warning("verify of %s -> %s: %d blocks differ (cycles %s..%s)%s", volume,
                        label, n, *outcome.cycles, "" if repair else ", not repaired")
        else:
            log.info("verify of %s -> %s: clean (cycles %s..%s, %.2fs)", volume, label,
                     *outcome.cycles, outcome.duration)
        if n and repair:
            result["repair"] = self._repair(driver, index, label, run, outcome.mismatched)
        record["run"].update(status="done", next_offset=outcome.offset + outcome.length,
                             updated=time.time())
        record["last"] = result
        json_path = self._verify_paths(driver, volume, label)[0]
        _write_json(json_path, record)  # before the wait: a restart still knows the repair
        if result["repair"] is not None:
            result["repair"] = self._wait_repair(driver, run, result["repair"], repair_wait)
            record["last"] = result
            _write_json(json_path, record)
        result["state"] = self._verify_state(driver, run.label, result)
        return result

    def _repair(self, driver, index, label, run, found: ExtentBitmap) -> dict:
        subject = driver.subject
        if len(subject.volumes) > 1:
            blocks = ExtentBitmap(subject.nblocks)
            off = subject.offsets[index]
            for start, count in found.iter_runs():
                blocks.set_range(off + start, count)
        else:
            blocks = found
        applied_before = _held(driver.status()["targets"].get(run.label, {}))
        cycle = driver.owe_blocks(run.label, blocks)
        log.warning("verify of %s -> %s: %d differing blocks owed to the target, in cycle %s",
                    subject.volumes[index].name, label, found.count(),
                    cycle if cycle is not None else "after a resume (the mirror is broken)")
        return {"blocks": found.count(), "cycle": cycle, "after_cycle": applied_before,
                "requested": time.time(), "applied": False}

    def _wait_repair(self, driver, run, rep: dict, wait: float) -> dict:
        if rep["cycle"] is None:
            return rep
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and not self._stop.is_set():
            t = driver.status()["targets"].get(run.label, {})
            # Held (committed) is enough: the target applies it, after a crash too, and a
            # verify of it waits for that apply.
            if _held(t) >= rep["cycle"] and not driver.repair_pending(run.label):
                rep.update(applied=True, applied_cycle=t.get("last_cycle"),
                           raw_bytes=t.get("bytes_raw"), wire_bytes=t.get("bytes_wire"))
                return rep
            if t.get("phase") == "broken":
                break
            time.sleep(0.1)
        return rep

    def _verify_state(self, driver, run_label: str, last: dict | None) -> str:
        if last is None:
            return "never"
        if not last.get("mismatched_blocks"):
            return "clean"
        rep = last.get("repair")
        if not rep:
            return "mismatch"
        if rep.get("applied"):
            return "repaired"
        t = driver.status()["targets"].get(run_label, {})
        if (not driver.repair_pending(run_label) and _held(t) > max(
                rep.get("after_cycle") or 0, (rep.get("cycle") or 1) - 1)):
            return "repaired"
        return "repairing"

    # -- scrub --------------------------------------------------------------------------
    def _image(self, name: str):
        from cyclemirror.receiver.readers import (
            MIRROR_EXPORT_PREFIX,
            export_names,
            listed_export_names,
            mirror_images,
        )

        images = mirror_images(self.store.path)
        image = export_names(images).get(MIRROR_EXPORT_PREFIX + name)
        if image is None:
            known = [n[len(MIRROR_EXPORT_PREFIX):] for n in listed_export_names(images)]
            raise NotFoundError(f"no incoming mirror image {name!r} in this store (images: "
                                f"{', '.join(known) or 'none'}); name it SOURCE/VOLUME with "
                                "the source's node name or id")
        return image

    def _rbd_spans(self, image):
        """An RBD image's span reader for scrub (None for an image file)."""
        if image.backend != "rbd":
            return None
        rbd = self.config.rbd_config()
        if rbd is None:
            raise UsageError(f"mirror image {image.node_id}/{image.volume} lives in RBD; "
                             "scrub it on a daemon started with --rbd-pool")
        from cyclemirror.receiver.rbdbackend import RbdImageSpans

        return lambda throttle, check: RbdImageSpans(
            rbd, image.state_path, image.node_id, image.volume, image.block_size, throttle,
            check)

    @staticmethod
    def _scrub_path(image_path: str) -> str:
        return image_path[: -len(".img")] + ".scrub.json"

    def scrub(self, name: str, *, offset: int = 0, length: int = 0, bwlimit: int = 0,
              restart: bool = False) -> dict:
        """Scrub the incoming image ``SOURCE/VOLUME`` against its record."""
        return self._scrub_image(self._image(name), name, offset=offset, length=length,
                                 bwlimit=bwlimit, restart=restart)

    def _scrub_image(self, image, name: str, *, offset, length, bwlimit, restart) -> dict:
        from cyclemirror.receiver.scrub import scrub_image

        if length == 0:
            length = image.size - offset if 0 <= offset < image.size else 0
        key = ("scrub", image.node_id, image.volume)
        job = self._claim(key, length)
        json_path = self._scrub_path(image.image_path)
        record = None
        try:
            record = _read_json(json_path) or {"format": FORMAT, "image": image.image_path,
                                               "run": None, "last": None}
            prev = record.get("run") or {}
            resume_from, found = None, None
            nblocks = image.size // image.block_size
            if (not restart and prev.get("status") in ("running", "failed")
                    and (prev.get("offset"), prev.get("length")) == (offset, length)):
                try:
                    resume_from = int(prev["next_offset"])
                    found = ExtentBitmap(nblocks)
                    for start, count in prev.get("bad_runs", []):
                        found.set_range(int(start), int(count))
                except (BitmapError, KeyError, ValueError, TypeError) as exc:
                    log.warning("scrub of %s: cannot resume (%s); starting over", name, exc)
                    resume_from, found = None, None
            started = time.time()
            record["run"] = {"status": "running", "offset": offset, "length": length,
                             "next_offset": offset if resume_from is None else resume_from,
                             "started": started, "updated": started, "error": None,
                             "bad_runs": [] if found is None else
                             [list(r) for r in found.iter_runs()][:MAX_RUNS_KEPT]}
            _write_json(json_path, record)

            def progress(done: int, out) -> None:
                record["run"].update(next_offset=done, updated=time.time(),
                                     bad_runs=[list(r) for r in out.bad.iter_runs()]
                                     [:MAX_RUNS_KEPT])
                _write_json(json_path, record)
                job["done"] = done - out.offset  # what a restart would resume from

            vol = SimpleNamespace(size=image.size, block_size=image.block_size)
            out = scrub_image(image.state_path, image.image_path, vol, offset=offset,
                              length=length, rate=bwlimit, resume_from=resume_from,
                              found=found, on_progress=progress, cancel=self._stop,
                              make_spans=self._rbd_spans(image))
        except BaseException as exc:
            if record is not None and record.get("run"):
                record["run"].update(status="failed", updated=time.time(),
                                     error=f"{type(exc).__name__}: {exc}")
                try:
                    _write_json(json_path, record)
                except OSError:
                    pass
            log.warning("scrub of %s failed: %s: %s", name, type(exc).__name__, exc)
            self._release(key)
            raise
        try:
            bad = out.bad.count()
            extents, truncated = extents_of(out.bad, image.block_size)
            result = {
                "image": image.image_path, "source_node": image.node_id,
                "source_name": image.node_name, "volume": image.volume,
                "state": "rot" if bad else "clean", "offset": out.offset,
                "length": out.length, "resumed_from": out.resumed_from, "cycles": out.cycles,
                "bad_blocks": bad, "bad_bytes": bad * image.block_size,
                "block_size": image.block_size, "extents": extents,
                "extents_truncated": truncated, "checked_blocks": out.checked_blocks,
                "unchecked_blocks": out.unchecked_blocks, "damaged_pages": out.damaged_pages,
                "new_record": out.new_record, "read_bytes": out.bytes_read,
                "duration": out.duration, "started": record["run"]["started"],
                "finished": time.time(),
            }
            (log.warning if bad else log.info)(
                "scrub of %s: %s (%d blocks checked, %d without a recorded digest yet%s)",
                name, f"{bad} blocks differ from their recorded digests" if bad else "clean",
                out.checked_blocks, out.unchecked_blocks,
                f", {out.damaged_pages} damaged record pages" if out.damaged_pages else "")
            record["run"].update(status="done", next_offset=out.offset + out.length,
                                 updated=time.time(), bad_runs=[])
            record["last"] = result
            _write_json(json_path, record)
            return result
        finally:
            self._release(key)

    # -- status -------------------------------------------------------------------------
    def annotate(self, doc: dict) -> None:
        """Add ``verify`` to each outgoing row and ``scrub`` / ``source_verify`` to each
        incoming row of the status document (docs/cli.md)."""
        now = doc.get("time") or time.time()
        with self._lock:
            running = {k: dict(v) for k, v in self._running.items()}
        for row in doc.get("mirrors", []):
            try:
                row["verify"] = self._verify_row(row, running, now)
            except CycleMirrorError as exc:
                row["verify"] = {"state": "never", "error": str(exc)}
        for row in doc.get("incoming", []):
            row["scrub"] = self._scrub_row(row, running, now)
            row["source_verify"] = self._source_verify_row(row)

    def _verify_row(self, row: dict, running: dict, now: float) -> dict:
        volume, label = row["volume"], row["target"]
        try:
            driver, _index, runs = self.outgoing.check_subject(volume, label)
        except CycleMirrorError:
            return {"state": "never", "last_finished": None, "age": None, "error": None,
                    "running": None}
        run = runs[0][1]
        record = _read_json(self._verify_paths(driver, volume, label)[0]) or {}
        last = record.get("last")
        job = running.get(("verify", volume, label))
        cur = record.get("run") or {}
        state = "running" if job else self._verify_state(driver, run.label, last)
        if state in ("never",) and cur.get("status") == "failed":
            state = "failed"
        finished = last.get("finished") if last else None
        return {
            "state": state,
            "last_finished": finished,
            "age": (now - finished) if finished else None,
            "cycles": last.get("cycles") if last else None,
            "mismatched_blocks": last.get("mismatched_blocks") if last else None,
            "extents": (last.get("extents") or [])[:20] if last else [],
            "repair": last.get("repair") if last else None,
            "error": cur.get("error") if cur.get("status") == "failed" else None,
            "running": None if not job else {"done": job["done"], "total": job["total"],
                                             "started": job["started"]},
        }

    def _scrub_row(self, row: dict, running: dict, now: float) -> dict:
        image = row.get("image")
        if not image:
            return {"state": "never"}
        record = _read_json(self._scrub_path(image)) or {}
        last = record.get("last")
        cur = record.get("run") or {}
        job = running.get(("scrub", row.get("source_node"), row.get("volume")))
        if job:
            state = "running"
        elif last:
            state = last["state"]
        else:
            state = "failed" if cur.get("status") == "failed" else "never"
        finished = last.get("finished") if last else None
        return {
            "state": state, "last_finished": finished,
            "age": (now - finished) if finished else None,
            "bad_blocks": last.get("bad_blocks") if last else None,
            "checked_blocks": last.get("checked_blocks") if last else None,
            "unchecked_blocks": last.get("unchecked_blocks") if last else None,
            "extents": (last.get("extents") or [])[:20] if last else [],
            "cycles": last.get("cycles") if last else None,
            "error": cur.get("error") if cur.get("status") == "failed" else None,
            "running": None if not job else {"done": job["done"], "total": job["total"],
                                             "started": job["started"]},
        }

    @staticmethod
    def _source_verify_row(row: dict) -> dict | None:
        from cyclemirror.receiver.verify import verify_record_path

        image = row.get("image")
        if not image:
            return None
        try:
            with open(verify_record_path(image), "rb") as fh:
                body = json.load(fh)
        except (OSError, ValueError):
            return None
        if not isinstance(body, dict):
            return None
        return {k: body.get(k) for k in ("time", "cycle", "offset", "length",
                                         "mismatched_blocks")}

    # -- the schedule -------------------------------------------------------------------
    def _schedule(self) -> None:
        while not self._stop.wait(TICK):
            try:
                self._due_jobs()
            except Exception:  # noqa: BLE001 - the schedule must go on
                log.exception("scheduled checks failed")

    @staticmethod
    def _due(record: dict | None, every: float, now: float) -> bool:
        if not every:
            return False
        if not record or not record.get("run"):
            return True
        run = record["run"]
        if run.get("status") == "running":
            return True  # interrupted by a restart: resume it now
        last = record.get("last")
        if run.get("status") == "failed":
            return now - (run.get("updated") or 0) >= min(every, RETRY_FAILED)
        return last is None or now - (last.get("finished") or 0) >= every

    def _due_jobs(self) -> None:
        cfg = self.config
        now = time.time()
        if cfg.verify_every:
            for volume, label in self.outgoing.pairs():
                if self._stop.is_set():
                    return
                try:
                    driver, _index, _runs = self.outgoing.check_subject(volume, label)
                except CycleMirrorError:
                    continue
                record = _read_json(self._verify_paths(driver, volume, label)[0])
                if not self._due(record, cfg.verify_every, now):
                    continue
                run = (record or {}).get("run") or {}
                offset, length = run.get("offset", 0), run.get("length", 0)
                if run.get("status") not in ("running", "failed"):
                    offset, length = 0, 0
                try:
                    self.verify(volume, label, repair=cfg.verify_repair, offset=offset,
                                length=length, bwlimit=cfg.verify_bwlimit)
                except (CycleMirrorError, OSError) as exc:
                    log.warning("scheduled verify of %s -> %s: %s", volume, label, exc)
        if cfg.scrub_every:
            from cyclemirror.receiver.readers import mirror_images

            for image in mirror_images(self.store.path):
                if self._stop.is_set():
                    return
                record = _read_json(self._scrub_path(image.image_path))
                if not self._due(record, cfg.scrub_every, now):
                    continue
                run = (record or {}).get("run") or {}
                offset, length = run.get("offset", 0), run.get("length", 0)
                if run.get("status") not in ("running", "failed"):
                    offset, length = 0, 0
                try:
                    self._scrub_image(image, f"{image.node_id}/{image.volume}", offset=offset,
                                      length=length, bwlimit=cfg.scrub_bwlimit, restart=False)
                except (CycleMirrorError, OSError) as exc:
                    log.warning("scheduled scrub of %s/%s: %s", image.node_id, image.volume,
                                exc)

