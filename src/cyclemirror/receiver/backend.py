"""Where a target keeps its mirror images: the backend interface and the choice of one.

A ``Mirror`` (``receiver.mirror``) owns the protocol, the state file (the apply
journal) and the staging logs, which always live in the store directory; the
images themselves live in a backend, chosen per mirror:

* ``FileBackend`` (``receiver.filebackend``): raw image files
  ``<volume>.img`` next to the state file, the format of every target so far.
* ``RbdBackend`` (``receiver.rbdbackend``): RBD images in a Ceph pool with a
  snapshot ``cyclemirror-<cycle>`` per applied cycle.

A backend answers the questions apply and recovery ask, and nothing else:

``images_present()``        every member has an image (after a first cycle)
``check_sizes()``           raise ``StoreError`` if an image's size is off
``full_writer(i, size)``    a writer (``write``, ``punch``, ``sync``, ``close``)
                            of member ``i``'s next full image, built apart
``full_present()``          the full images being built are all there
``discard_full()``          drop the full images being built
``install_full(cycle)``     redo of a committed full cycle: the built images
                            become the mirror's (idempotent)
``open_delta(cycle, recovering)``  a ``DeltaApply`` (``write``, ``zero``,
                            ``scatter``, ``finish``, ``close``) that replays a
                            committed delta (idempotent records); its
                            ``visible_before_finish`` (default False) says the
                            writes are in the images readers open before
                            ``finish`` makes them durable (the target then
                            reports the cycle applied before ``finish``)
``discard_partial_apply()`` leftovers of an apply a crash cut before its commit
``applied(cycle)``          the cycle is in the images; make it the
                            consistent copy readers see (RBD: the snapshot)
``after_state_saved(cycle)`` the state names ``cycle`` as applied: drop what
                            older cycles needed (RBD: snapshots beyond the
                            last ``keep_cycles``)
``new_member(name, size)``, ``remove_member(name)``, ``members_changed()``
                            a group's members change
``describe()``              what ``status`` shows of where the images are
``close()``

The kind of a mirror's backend is recorded in its state (``extra["backend"]``,
absent for files, so file mirrors keep their state format); a new mirror takes
the daemon's configured kind.  ``open_backend`` is the one place that picks.
"""

from __future__ import annotations

from dataclasses import dataclass

from cyclemirror.errors import UsageError

BACKEND_KEY = "backend"  # in MirrorState.extra; absent: the file backend


@dataclass(frozen=True)
class RbdConfig:
    """Where a daemon puts new mirrors' images: a pool (and namespace) of a Ceph cluster."""

    pool: str
    namespace: str | None = None
    conf: str | None = None  # the cluster's config file (None: Ceph's default paths)
    client: str = "client.admin"
    keyring: str | None = None  # None: what the config names
    keep_cycles: int = 1  # cycle snapshots kept per image: the last one, plus history

    def __post_init__(self):
        if isinstance(self.keep_cycles, bool) or not isinstance(self.keep_cycles, int) \
                or self.keep_cycles < 1:
            raise UsageError(f"keep_cycles must be a whole number >= 1 (the cycle snapshots "
                             f"kept per RBD image, the last one included), not "
                             f"{self.keep_cycles!r}")

    def describe(self) -> str:
        where = f"{self.pool}/{self.namespace}" if self.namespace else self.pool
        return f"rbd:{where} as {self.client}"


def backend_record(state) -> dict | None:
    """The backend a mirror's state records (None: raw files)."""
    rec = state.extra.get(BACKEND_KEY)
    if rec is None:
        return None
    if not isinstance(rec, dict) or rec.get("kind") != "rbd":
        raise UsageError(f"mirror {state.mirror!r}: its state names an unknown backend "
                         f"{rec!r}; this version knows 'file' and 'rbd'")
    return rec


def rbd_status(state, rec: dict) -> dict:
    """What ``status`` shows of an RBD mirror: pool, images, the consistent snapshot."""
    node = state.source_node
    return {"backend": "rbd", "pool": rec.get("pool"), "namespace": rec.get("namespace"),
            "images": [f"{node}~{v.name}" for v in state.volumes],
            "snapshot": f"cyclemirror-{state.applied_cycle}" if state.applied_cycle else None}


def open_backend(directory: str, state, rbd=None):
    """The backend of the mirror with ``state`` in ``directory``.

    ``rbd``: the daemon's ``RbdConfig`` (cluster, client, pool) or None.  A mirror
    whose state records RBD needs it; a new mirror (no applied or pending cycle
    yet, no record) is put into RBD when it is given.
    """
    rec = backend_record(state)
    fresh = (state.applied_cycle == 0 and state.pending is None and state.committed is None)
    if rec is None and rbd is not None and fresh:
        rec = {"kind": "rbd", "pool": rbd.pool, "namespace": rbd.namespace}
        state.extra[BACKEND_KEY] = rec  # saved with the state's next save (begin)
    if rec is None:
        from cyclemirror.receiver.filebackend import FileBackend

        return FileBackend(directory, state)
    if rbd is None:
        raise UsageError(
            f"mirror {state.mirror!r} of source {state.source_node}: its images live in RBD "
            f"pool {rec.get('pool')!r}; start 'cyclemirror serve' with --rbd-pool (and "
            "--ceph-conf, --ceph-client, --ceph-keyring as needed) to reach them")
    from cyclemirror.receiver.rbdbackend import RbdBackend

    return RbdBackend(directory, state, rbd, rec)
