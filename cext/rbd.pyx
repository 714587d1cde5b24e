"""A small binding of librados' and librbd's C API: what an RBD mirror target needs.

Built only where librbd's and librados' headers are installed (Debian's
librbd-dev, librados-dev); setup.py skips it elsewhere, and nothing else
imports it unless an RBD target is asked for.  Debian's python3-rbd is built
for Debian's own interpreter only, hence a binding of our own.

``Cluster(conf, client, keyring)`` connects; ``Cluster.ioctx(pool, namespace)``
opens a pool; ``IoCtx`` creates, removes, renames and opens images;
``Image`` reads, writes, discards, flushes and handles snapshots, and lists
what changed since a snapshot (``diff``).

Writes and write-zeroes are asynchronous (``rbd_aio_write``,
``rbd_aio_write_zeroes``) with up to ``MAX_INFLIGHT`` in flight: ``write``
borrows the caller's buffer (no copy) and holds it until librbd is done with
it.  An operation that overlaps one in flight, and every discard, first waits
for those in flight, so the image sees them in the caller's order.  ``flush`` waits for all of them and flushes librbd's
cache: only after it returns are the writes durable.  Every call that waits
on the cluster runs without the GIL.  Failures raise ``OSError`` with the
errno librbd returned and a message naming the call and the image.

``Image.object_writer()`` gives, for a plain image, an ``ObjectWriter``: a
delta's scattered writes gathered into one RADOS operation per data object
(see its docstring), which is what bounds a delta's apply on the OSD.
"""

from libc.stdint cimport uint8_t, uint64_t, int64_t
from libc.stdlib cimport malloc, free, realloc
from posix.time cimport time_t
from libc.string cimport strerror
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING

cdef extern from "rados/librados.h" nogil:
    ctypedef void *rados_t
    ctypedef void *rados_ioctx_t
    int rados_create2(rados_t *pcluster, const char *clustername, const char *name,
                      uint64_t flags)
    int rados_conf_read_file(rados_t cluster, const char *path)
    int rados_conf_set(rados_t cluster, const char *option, const char *value)
    int rados_connect(rados_t cluster)
    void rados_shutdown(rados_t cluster)
    int rados_ioctx_create(rados_t cluster, const char *pool_name, rados_ioctx_t *ioctx)
    void rados_ioctx_destroy(rados_ioctx_t io)
    void rados_ioctx_set_namespace(rados_ioctx_t io, const char *nspace)
    void rados_set_pool_full_try(rados_ioctx_t io)
    ctypedef void *rados_write_op_t
    ctypedef void *rados_completion_t
    ctypedef void (*rados_callback_t)(rados_completion_t cb, void *arg)
    ctypedef uint64_t rados_snap_t
    int rados_ioctx_create2(rados_t cluster, int64_t pool_id, rados_ioctx_t *ioctx)
    int rados_ioctx_selfmanaged_snap_set_write_ctx(rados_ioctx_t io, rados_snap_t seq,
                                                   rados_snap_t *snaps, int num_snaps)
    int rados_exec(rados_ioctx_t io, const char *oid, const char *cls, const char *method,
                   const char *in_buf, size_t in_len, char *buf, size_t out_len)
    rados_write_op_t rados_create_write_op()
    void rados_release_write_op(rados_write_op_t write_op)
    void rados_write_op_write(rados_write_op_t write_op, const char *buffer, size_t len,
                              uint64_t offset)
    int rados_aio_create_completion2(void *cb_arg, rados_callback_t cb_complete,
                                     rados_completion_t *pc)
    int rados_aio_write_op_operate(rados_write_op_t write_op, rados_ioctx_t io,
                                   rados_completion_t completion, const char *oid,
                                   time_t *mtime, int flags)
    int rados_aio_wait_for_complete(rados_completion_t c)
    int rados_aio_is_complete(rados_completion_t c)
    int rados_aio_get_return_value(rados_completion_t c)
    void rados_aio_release(rados_completion_t c)

cdef extern from "rbd/librbd.h" nogil:
    ctypedef void *rbd_image_t
    ctypedef void *rbd_completion_t
    ctypedef void (*rbd_callback_t)(rbd_completion_t cb, void *arg)
    ctypedef struct rbd_snap_info_t:
        uint64_t id
        uint64_t size
        const char *name
    int rbd_create2(rados_ioctx_t io, const char *name, uint64_t size, uint64_t features,
                    int *order)
    int rbd_remove(rados_ioctx_t io, const char *name)
    int rbd_rename(rados_ioctx_t src_io_ctx, const char *srcname, const char *destname)
    int rbd_open(rados_ioctx_t io, const char *name, rbd_image_t *image, const char *snap_name)
    int rbd_open_read_only(rados_ioctx_t io, const char *name, rbd_image_t *image,
                           const char *snap_name)
    int rbd_close(rbd_image_t image)
    int rbd_get_size(rbd_image_t image, uint64_t *size)
    int rbd_resize(rbd_image_t image, uint64_t size)
    ctypedef struct rbd_image_info_t:
        uint64_t size
        uint64_t obj_size
        int order
    int rbd_stat(rbd_image_t image, rbd_image_info_t *info, size_t infosize)
    int rbd_get_features(rbd_image_t image, uint64_t *features)
    int rbd_get_stripe_unit(rbd_image_t image, uint64_t *stripe_unit)
    int rbd_get_stripe_count(rbd_image_t image, uint64_t *stripe_count)
    int rbd_get_overlap(rbd_image_t image, uint64_t *overlap)
    int rbd_get_id(rbd_image_t image, char *id, size_t id_len)
    int rbd_get_block_name_prefix(rbd_image_t image, char *prefix, size_t prefix_len)
    int64_t rbd_get_data_pool_id(rbd_image_t image)
    ssize_t rbd_read(rbd_image_t image, uint64_t ofs, size_t len, char *buf)
    int rbd_discard(rbd_image_t image, uint64_t ofs, uint64_t len)
    int rbd_flush(rbd_image_t image)
    int rbd_snap_create(rbd_image_t image, const char *snapname)
    int rbd_snap_remove(rbd_image_t image, const char *snapname)
    int rbd_snap_rollback(rbd_image_t image, const char *snapname)
    int rbd_snap_list(rbd_image_t image, rbd_snap_info_t *snaps, int *max_snaps)
    void rbd_snap_list_end(rbd_snap_info_t *snaps)
    int rbd_snap_remove_by_id(rbd_image_t image, uint64_t snap_id)
    ctypedef int rbd_snap_namespace_type_t
    int rbd_snap_get_namespace_type(rbd_image_t image, uint64_t snap_id,
                                    rbd_snap_namespace_type_t *namespace_type)
    int rbd_aio_create_completion(void *cb_arg, rbd_callback_t complete_cb,
                                  rbd_completion_t *c)
    int rbd_aio_write(rbd_image_t image, uint64_t off, size_t len, const char *buf,
                      rbd_completion_t c)
    int rbd_aio_write_zeroes(rbd_image_t image, uint64_t off, size_t len, rbd_completion_t c,
                             int zero_flags, int op_flags)
    int rbd_aio_wait_for_complete(rbd_completion_t c)
    ssize_t rbd_aio_get_return_value(rbd_completion_t c)
    void rbd_aio_release(rbd_completion_t c)
    ctypedef void *rbd_image_options_t
    void rbd_image_options_create(rbd_image_options_t *opts)
    void rbd_image_options_destroy(rbd_image_options_t opts)
    int rbd_image_options_set_uint64(rbd_image_options_t opts, int optname, uint64_t optval)
    int rbd_clone3(rados_ioctx_t p_ioctx, const char *p_name, const char *p_snapname,
                   rados_ioctx_t c_ioctx, const char *c_name, rbd_image_options_t c_opts)
    int rbd_flatten(rbd_image_t image)
    int rbd_snap_protect(rbd_image_t image, const char *snap_name)
    int rbd_snap_unprotect(rbd_image_t image, const char *snap_name)
    int rbd_snap_is_protected(rbd_image_t image, const char *snap_name, int *is_protected)
    int rbd_diff_iterate2(rbd_image_t image, const char *fromsnapname, uint64_t ofs,
                          uint64_t len, uint8_t include_parent, uint8_t whole_object,
                          int (*cb)(uint64_t, size_t, int, void *) noexcept nogil, void *arg)

ctypedef int (*snap_fn)(rbd_image_t image, const char *snapname) noexcept nogil

cdef enum:
    _MAX_INFLIGHT = 16
    _MAX_SNAPS = 1024
    _FEATURE_LAYERING = 1  # the only feature our images need
    _OPT_FEATURES = 1  # RBD_IMAGE_OPTION_FEATURES
    _OPT_ORDER = 2  # RBD_IMAGE_OPTION_ORDER
    _OPT_CLONE_FORMAT = 12  # RBD_IMAGE_OPTION_CLONE_FORMAT

MAX_INFLIGHT = _MAX_INFLIGHT


cdef struct _Extents:
    uint64_t *data  # (offset, length, exists) triples
    size_t n
    size_t cap
    bint oom


cdef int _diff_extent(uint64_t offset, size_t length, int exists, void *arg) noexcept nogil:
    cdef _Extents *ext = <_Extents *>arg
    cdef size_t cap
    cdef uint64_t *grown
    if ext.n + 3 > ext.cap:
        cap = ext.cap * 2 if ext.cap else 3 * 256
        grown = <uint64_t *>realloc(ext.data, cap * sizeof(uint64_t))
        if grown == NULL:
            ext.oom = True
            return -12  # ENOMEM: ends the iteration
        ext.data, ext.cap = grown, cap
    ext.data[ext.n] = offset
    ext.data[ext.n + 1] = length
    ext.data[ext.n + 2] = 1 if exists else 0
    ext.n += 3
    return 0


cdef object _error(long ret, str what):
    cdef int err = <int>(-ret)
    return OSError(err, f"{what}: {strerror(err).decode()}")


cdef bytes _c(object s, str what):
    if s is None:
        return None
    b = s.encode() if isinstance(s, str) else bytes(s)
    if b"\0" in b:
        raise ValueError(f"{what} must not contain NUL bytes")
    return b


cdef class Cluster:
    """A connection to one cluster as one client (``client.NAME``)."""

    cdef rados_t cluster
    cdef bint connected
    cdef readonly object client

    def __cinit__(self):
        self.cluster = NULL
        self.connected = False

    def __init__(self, conf=None, client="client.admin", keyring=None, options=None):
        """``options``: further config settings, e.g. timeouts, as {name: value}."""
        cdef bytes bname = _c(client, "client")
        cdef int ret = rados_create2(&self.cluster, b"ceph", bname, 0)
        if ret < 0:
            self.cluster = NULL
            raise _error(ret, f"rados_create2 as {client}")
        self.client = client
        cdef bytes bconf = _c(conf, "conf")
        cdef const char *cconf = NULL
        if bconf is not None:
            cconf = bconf
        ret = rados_conf_read_file(self.cluster, cconf)
        if ret < 0:
            raise _error(ret, f"reading the Ceph config {conf or '(default paths)'}")
        settings = dict(options or {})
        if keyring is not None:
            settings["keyring"] = keyring
        for name, value in settings.items():
            bn, bv = _c(name, "option"), _c(str(value), "value")
            ret = rados_conf_set(self.cluster, bn, bv)
            if ret < 0:
                raise _error(ret, f"setting Ceph option {name}={value}")

    def connect(self):
        cdef int ret
        with nogil:
            ret = rados_connect(self.cluster)
        if ret < 0:
            raise _error(ret, f"connecting to the Ceph cluster as {self.client}")
        self.connected = True

    def ioctx(self, pool, namespace=None):
        """An I/O context on ``pool`` (and ``namespace``, if given)."""
        if not self.connected:
            raise ValueError("Cluster.ioctx before connect()")
        return IoCtx(self, pool, namespace)

    def shutdown(self):
        if self.cluster != NULL:
            with nogil:
                rados_shutdown(self.cluster)
            self.cluster = NULL
            self.connected = False

    def __dealloc__(self):
        if self.cluster != NULL:
            rados_shutdown(self.cluster)
            self.cluster = NULL


cdef class IoCtx:
    cdef rados_ioctx_t io
    cdef readonly Cluster cluster
    cdef readonly object pool
    cdef readonly object namespace
    cdef readonly bint full_try

    def __cinit__(self):
        self.io = NULL
        self.full_try = False

    def __init__(self, Cluster cluster not None, pool, namespace=None):
        cdef bytes bpool = _c(pool, "pool")
        cdef const char *cpool = bpool
        cdef int ret
        with nogil:
            ret = rados_ioctx_create(cluster.cluster, cpool, &self.io)
        if ret < 0:
            self.io = NULL
            raise _error(ret, f"opening Ceph pool {pool!r}")
        self.cluster, self.pool, self.namespace = cluster, pool, namespace
        cdef bytes bns
        if namespace:
            bns = _c(namespace, "namespace")
            rados_ioctx_set_namespace(self.io, bns)

    cdef void _check(self) except *:
        if self.io == NULL:
            raise ValueError("the I/O context is closed")

    def set_pool_full_try(self):
        """Writes to a full pool fail at once (EDQUOT: its quota; ENOSPC: a full OSD)
        instead of waiting, paused, until the pool has room or the op timeout ends them.

        Images opened from this context afterwards inherit it (librbd copies it), and
        so does an image's ``ObjectWriter`` (its own context on the data pool).
        """
        self._check()
        rados_set_pool_full_try(self.io)
        self.full_try = True

    def create(self, name, uint64_t size):
        """Create image ``name`` of ``size`` bytes (layering only, 4 MiB objects)."""
        self._check()
        cdef bytes bname = _c(name, "image name")
        cdef const char *cname = bname
        cdef int order = 22
        cdef int ret
        with nogil:
            ret = rbd_create2(self.io, cname, size, _FEATURE_LAYERING, &order)
        if ret < 0:
            raise _error(ret, f"creating RBD image {self.pool}/{name}")

    def remove(self, name):
        self._check()
        cdef bytes bname = _c(name, "image name")
        cdef const char *cname = bname
        cdef int ret
        with nogil:
            ret = rbd_remove(self.io, cname)
        if ret < 0:
            raise _error(ret, f"removing RBD image {self.pool}/{name}")

    def rename(self, old, new):
        self._check()
        cdef bytes bold = _c(old, "image name"), bnew = _c(new, "image name")
        cdef const char *cold = bold
        cdef const char *cnew = bnew
        cdef int ret
        with nogil:
            ret = rbd_rename(self.io, cold, cnew)
        if ret < 0:
            raise _error(ret, f"renaming RBD image {self.pool}/{old} to {new}")

    def clone(self, parent, snapshot, child, int clone_format=2):
        """Create image ``child`` as a copy-on-write clone of ``parent@snapshot``.

        ``clone_format`` 2 needs no protected snapshot (the cluster must require
        clients of mimic or later); 1 needs ``snapshot`` protected first.
        """
        self._check()
        cdef bytes bp = _c(parent, "image name"), bs = _c(snapshot, "snapshot name")
        cdef bytes bc = _c(child, "image name")
        cdef const char *cp = bp
        cdef const char *cs = bs
        cdef const char *cc = bc
        cdef rbd_image_options_t opts
        cdef int ret
        rbd_image_options_create(&opts)
        try:
            rbd_image_options_set_uint64(opts, _OPT_FEATURES, _FEATURE_LAYERING)
            rbd_image_options_set_uint64(opts, _OPT_ORDER, 22)
            rbd_image_options_set_uint64(opts, _OPT_CLONE_FORMAT, clone_format)
            with nogil:
                ret = rbd_clone3(self.io, cp, cs, self.io, cc, opts)
        finally:
            rbd_image_options_destroy(opts)
        if ret < 0:
            raise _error(ret, f"cloning RBD image {self.pool}/{parent}@{snapshot} to {child}")

    def open(self, name, snapshot=None, bint read_only=False):
        """Open image ``name`` (at ``snapshot``, read-only, if given)."""
        self._check()
        return Image(self, name, snapshot, read_only)

    def close(self):
        if self.io != NULL:
            rados_ioctx_destroy(self.io)
            self.io = NULL

    def __dealloc__(self):
        if self.io != NULL:
            rados_ioctx_destroy(self.io)
            self.io = NULL


cdef class Image:
    cdef rbd_image_t image
    cdef readonly IoCtx ioctx
    cdef readonly object name
    cdef readonly object snapshot
    cdef rbd_completion_t comps[_MAX_INFLIGHT]
    cdef Py_buffer bufs[_MAX_INFLIGHT]
    cdef uint64_t starts[_MAX_INFLIGHT]
    cdef uint64_t ends[_MAX_INFLIGHT]
    cdef bint has_buf[_MAX_INFLIGHT]
    cdef int head, count
    cdef long first_error

    def __cinit__(self):
        self.image = NULL
        self.head = self.count = 0
        cdef int i
        for i in range(_MAX_INFLIGHT):
            self.has_buf[i] = False
        self.first_error = 0

    def __init__(self, IoCtx ioctx not None, name, snapshot=None, bint read_only=False):
        cdef bytes bname = _c(name, "image name")
        cdef bytes bsnap = _c(snapshot, "snapshot name")
        cdef const char *csnap = NULL
        if bsnap is not None:
            csnap = bsnap
        cdef const char *cname = bname
        cdef int ret
        with nogil:
            if read_only:
                ret = rbd_open_read_only(ioctx.io, cname, &self.image, csnap)
            else:
                ret = rbd_open(ioctx.io, cname, &self.image, csnap)
        if ret < 0:
            self.image = NULL
            at = f"@{snapshot}" if snapshot else ""
            raise _error(ret, f"opening RBD image {ioctx.pool}/{name}{at}")
        self.ioctx, self.name, self.snapshot = ioctx, name, snapshot

    cdef void _check(self) except *:
        if self.image == NULL:
            raise ValueError(f"RBD image {self.name} is closed")

    def size(self):
        self._check()
        cdef uint64_t size = 0
        cdef int ret = rbd_get_size(self.image, &size)
        if ret < 0:
            raise _error(ret, f"size of RBD image {self.name}")
        return size

    def resize(self, uint64_t size):
        """Give the head ``size`` bytes (a shrink drops the tail, a growth reads as
        zeroes); waits for writes in flight first."""
        self._check()
        self.drain()
        cdef int ret
        with nogil:
            ret = rbd_resize(self.image, size)
        if ret < 0:
            raise _error(ret, f"resizing RBD image {self.name} to {size} bytes")

    def read(self, uint64_t offset, size_t length):
        self._check()
        out = PyBytes_FromStringAndSize(NULL, length)
        cdef char *p = PyBytes_AS_STRING(out)
        cdef size_t done = 0
        cdef ssize_t got = 0
        with nogil:
            while done < length:
                got = rbd_read(self.image, offset + done, length - done, p + done)
                if got <= 0:
                    break
                done += <size_t>got
        if got < 0:
            raise _error(got, f"reading RBD image {self.name} at {offset + done}")
        if done < length:
            raise OSError(5, f"reading RBD image {self.name}: short read at {offset + done}")
        return out

    cdef int _reap_one(self) except -1:
        cdef rbd_completion_t c = self.comps[self.head]
        cdef ssize_t r
        with nogil:
            rbd_aio_wait_for_complete(c)
            r = rbd_aio_get_return_value(c)
            rbd_aio_release(c)
        if self.has_buf[self.head]:
            PyBuffer_Release(&self.bufs[self.head])
            self.has_buf[self.head] = False
        self.head = (self.head + 1) % _MAX_INFLIGHT
        self.count -= 1
        if r < 0 and self.first_error == 0:
            self.first_error = r
        return 0

    def drain(self):
        """Wait for every write in flight; raise the first one's failure."""
        while self.count:
            self._reap_one()
        cdef long err = self.first_error
        if err:
            self.first_error = 0
            raise _error(err, f"writing RBD image {self.name}")

    def write(self, data, uint64_t offset):
        """Queue an asynchronous write of ``data`` (bytes-like, borrowed) at ``offset``."""
        self._check()
        cdef int slot
        cdef Py_buffer view
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        cdef uint64_t end = offset + <uint64_t>view.len
        if view.len == 0:
            PyBuffer_Release(&view)
            return
        try:
            self._make_room(offset, end)
        except BaseException:
            PyBuffer_Release(&view)
            raise
        slot = (self.head + self.count) % _MAX_INFLIGHT
        cdef rbd_completion_t c = NULL
        cdef int ret = rbd_aio_create_completion(NULL, NULL, &c)
        if ret < 0:
            PyBuffer_Release(&view)
            raise _error(ret, f"rbd_aio_create_completion for {self.name}")
        with nogil:
            ret = rbd_aio_write(self.image, offset, <size_t>view.len, <const char *>view.buf, c)
        if ret < 0:
            rbd_aio_release(c)
            PyBuffer_Release(&view)
            raise _error(ret, f"writing RBD image {self.name} at {offset}")
        self.comps[slot] = c
        self.bufs[slot] = view
        self.has_buf[slot] = True
        self.starts[slot] = offset
        self.ends[slot] = end
        self.count += 1

    cdef int _make_room(self, uint64_t offset, uint64_t end) except -1:
        """Wait for what overlaps [offset, end) (order) and for a free slot; raise a
        failure of an earlier operation."""
        cdef int k, i
        for k in range(self.count):
            i = (self.head + k) % _MAX_INFLIGHT
            if self.starts[i] < end and offset < self.ends[i]:
                self.drain()
                break
        if self.count == _MAX_INFLIGHT:
            self._reap_one()
        if self.first_error:
            self.drain()  # raises
        return 0

    def discard(self, uint64_t offset, uint64_t length):
        """Make the range read as zeroes, deallocating what librbd can."""
        self._check()
        self.drain()
        cdef int ret
        with nogil:
            ret = rbd_discard(self.image, offset, length)
        if ret < 0:
            raise _error(ret, f"discarding {offset}+{length} of RBD image {self.name}")

    def write_zeroes(self, uint64_t offset, uint64_t length):
        """Queue an asynchronous write-zeroes (whole objects are deallocated), in order."""
        self._check()
        if length == 0:
            return
        self._make_room(offset, offset + length)
        cdef int slot = (self.head + self.count) % _MAX_INFLIGHT
        cdef rbd_completion_t c = NULL
        cdef int ret = rbd_aio_create_completion(NULL, NULL, &c)
        if ret < 0:
            raise _error(ret, f"rbd_aio_create_completion for {self.name}")
        with nogil:
            ret = rbd_aio_write_zeroes(self.image, offset, <size_t>length, c, 0, 0)
        if ret < 0:
            rbd_aio_release(c)
            raise _error(ret, f"zeroing {offset}+{length} of RBD image {self.name}")
        self.comps[slot] = c
        self.has_buf[slot] = False
        self.starts[slot] = offset
        self.ends[slot] = offset + length
        self.count += 1

    def flush(self):
        """Every write so far is durable in the cluster when this returns."""
        self._check()
        self.drain()
        cdef int ret
        with nogil:
            ret = rbd_flush(self.image)
        if ret < 0:
            raise _error(ret, f"flushing RBD image {self.name}")

    cdef int _snap_op(self, snap_fn fn, name, str what) except -1:
        """One snapshot call by name (create, remove, rollback), without the GIL."""
        self._check()
        cdef bytes b = _c(name, "snapshot name")
        cdef const char *cb = b
        cdef int ret
        with nogil:
            ret = fn(self.image, cb)
        if ret < 0:
            raise _error(ret, f"{what} snapshot {self.name}@{name}")
        return 0

    def snap_create(self, name):
        self._snap_op(rbd_snap_create, name, "creating")

    def snap_remove(self, name):
        self._snap_op(rbd_snap_remove, name, "removing")

    def snap_protect(self, name):
        self._snap_op(rbd_snap_protect, name, "protecting")

    def snap_unprotect(self, name):
        self._snap_op(rbd_snap_unprotect, name, "unprotecting")

    def snap_is_protected(self, name):
        self._check()
        cdef bytes b = _c(name, "snapshot name")
        cdef const char *cb = b
        cdef int prot = 0
        cdef int ret
        with nogil:
            ret = rbd_snap_is_protected(self.image, cb, &prot)
        if ret < 0:
            raise _error(ret, f"checking the protection of snapshot {self.name}@{name}")
        return bool(prot)

    def flatten(self):
        """Copy what this clone still reads from its parent into it (the parent may go)."""
        self._check()
        self.drain()
        cdef int ret
        with nogil:
            ret = rbd_flatten(self.image)
        if ret < 0:
            raise _error(ret, f"flattening RBD image {self.name}")

    def object_writer(self):
        """An ``ObjectWriter`` for this image's head, or None if the image is not plain
        (a feature but layering, parent data, striping): then write through librbd.

        Waits for (and flushes) what was written through this handle first."""
        self._check()
        if self.snapshot is not None:
            raise ValueError(f"RBD image {self.name} is open at a snapshot")
        self.flush()
        cdef uint64_t features = 0, overlap = 0, unit = 0, count = 0
        cdef rbd_image_info_t info
        cdef int ret = rbd_get_features(self.image, &features)
        if ret < 0:
            raise _error(ret, f"the features of RBD image {self.name}")
        if features & ~(<uint64_t>_FEATURE_PLAIN_MASK):
            return None
        ret = rbd_get_overlap(self.image, &overlap)
        if ret < 0 and ret != -2:  # ENOENT: no parent
            raise _error(ret, f"the parent overlap of RBD image {self.name}")
        if ret == 0 and overlap:
            return None
        ret = rbd_stat(self.image, &info, sizeof(info))
        if ret < 0:
            raise _error(ret, f"stat of RBD image {self.name}")
        if rbd_get_stripe_unit(self.image, &unit) < 0 or rbd_get_stripe_count(self.image, &count) < 0:
            return None
        if unit != info.obj_size or count != 1 or info.obj_size == 0:
            return None
        return ObjectWriter(self)

    def snap_rollback(self, name):
        """Make the head equal snapshot ``name`` (waits for writes in flight first)."""
        self.drain()
        self._snap_op(rbd_snap_rollback, name, "rolling back to")

    def diff(self, from_snapshot, uint64_t offset=0, length=None, bint whole_object=False):
        """The extents that differ between snapshot ``from_snapshot`` (None: an empty
        image) and what this handle reads (the head, or the snapshot it was opened at):
        ``[(offset, length, exists), ...]`` in offset order; ``exists`` False is a
        range that reads as zeroes now (discarded, or its object removed).  Within
        ``[offset, offset + length)`` (default: to the end).  ``rbd_diff_iterate2``:
        the OSDs answer from their snapshot records, nothing is read.
        """
        self._check()
        cdef uint64_t size = self.size()
        cdef uint64_t span = size - offset if length is None else <uint64_t>length
        if offset > size or span > size - offset:
            raise ValueError(f"diff of {self.name}: {offset}+{span} is outside its "
                             f"{size} bytes")
        cdef bytes b = _c(from_snapshot, "snapshot name")
        cdef const char *cb = NULL
        if b is not None:
            cb = b
        cdef _Extents ext
        ext.data, ext.n, ext.cap, ext.oom = NULL, 0, 0, False
        cdef int ret
        try:
            with nogil:
                ret = rbd_diff_iterate2(self.image, cb, offset, span, 1, whole_object,
                                        _diff_extent, &ext)
            if ext.oom:
                raise MemoryError(f"diff of {self.name}: out of memory for its extents")
            if ret < 0:
                raise _error(ret, f"diffing RBD image {self.name} against "
                                  f"{from_snapshot or 'nothing'}")
            return [(ext.data[i], ext.data[i + 1], ext.data[i + 2] != 0)
                    for i in range(0, ext.n, 3)]
        finally:
            free(ext.data)

    def snap_ids(self):
        """The image's snapshots of every namespace: [(name, id, namespace), ...] in
        creation order; namespace 0 user, 1 group, 2 trash (a snapshot being removed, or
        removed while a clone still needs it), 3 mirror."""
        self._check()
        cdef int maxn = _MAX_SNAPS
        cdef rbd_snap_info_t snaps[_MAX_SNAPS]
        cdef int ret, i
        cdef rbd_snap_namespace_type_t ns
        with nogil:
            ret = rbd_snap_list(self.image, snaps, &maxn)
        if ret < 0:
            raise _error(ret, f"listing the snapshots of {self.name}")
        out = []
        try:
            for i in range(ret):
                ns = 0
                if rbd_snap_get_namespace_type(self.image, snaps[i].id, &ns) < 0:
                    ns = -1
                out.append((snaps[i].name.decode(), snaps[i].id, ns))
        finally:
            rbd_snap_list_end(snaps)
        return out

    def snap_remove_by_id(self, uint64_t snap_id):
        """Remove the snapshot of id ``snap_id`` (of any namespace: a trashed one too)."""
        self._check()
        cdef int ret
        with nogil:
            ret = rbd_snap_remove_by_id(self.image, snap_id)
        if ret < 0:
            raise _error(ret, f"removing snapshot id {snap_id} of {self.name}")

    def snap_list(self):
        """The image's snapshots: [(name, size), ...] in creation order."""
        self._check()
        cdef int maxn = _MAX_SNAPS
        cdef rbd_snap_info_t snaps[_MAX_SNAPS]
        cdef int ret
        with nogil:
            ret = rbd_snap_list(self.image, snaps, &maxn)
        if ret < 0:
            raise _error(ret, f"listing the snapshots of {self.name}")
        out = [(snaps[i].name.decode(), snaps[i].size) for i in range(ret)]
        rbd_snap_list_end(snaps)
        return out

    def close(self):
        """Wait for writes in flight (their failure is raised), then close."""
        if self.image == NULL:
            return
        try:
            self.drain()
        finally:
            with nogil:
                rbd_close(self.image)
            self.image = NULL

    def __dealloc__(self):
        cdef int i
        while self.count:
            i = self.head
            rbd_aio_wait_for_complete(self.comps[i])
            rbd_aio_release(self.comps[i])
            if self.has_buf[i]:
                PyBuffer_Release(&self.bufs[i])
                self.has_buf[i] = False
            self.head = (self.head + 1) % _MAX_INFLIGHT
            self.count -= 1
        if self.image != NULL:
            rbd_close(self.image)
            self.image = NULL


# -- writes straight to the image's data objects --------------------------------------------

cdef enum:
    _MAX_OPS_INFLIGHT = 32
    _OP_MAX_EXTENTS = 512  # one object operation's sub-operations, at most
    # What an object writer allows: layering (its parent data is checked apart) and
    # operations (set on the parent of a clone: no say in how data is written).
    _FEATURE_PLAIN_MASK = 1 | (1 << 8)

OBJECT_OPS_INFLIGHT = _MAX_OPS_INFLIGHT
OBJECT_BYTES_INFLIGHT = 64 << 20  # and at most this many bytes (as ``rbd import``'s 10 x 4 MiB)
OBJECT_OP_MAX_EXTENTS = _OP_MAX_EXTENTS
OBJECT_WRITER_PENDING_BYTES = 64 << 20


cdef class ObjectWriter:
    """Writes into an image's head as one RADOS operation per data object.

    A delta of scattered blocks is thousands of small writes; through librbd
    each is an operation of its own on the OSD (queue, PG lock, transaction,
    commit).  Here the writes are gathered per 4 MiB data object, and each
    object gets one operation holding all of its extents (``write`` sub-ops,
    applied in the order given, atomically), sent with the image's snapshot
    context, exactly what librbd sends for each write of such an image, so
    the OSD makes the same copy-on-write clones for the image's snapshots.

    Only for a plain image (``Image.object_writer`` says which): no feature
    but layering and operations (no exclusive lock, object map or journal that librbd would
    keep up to date), no parent data (nothing to copy up), no fancy striping.
    ``write`` copies the data (librados does); operations on one object go
    out in call order, and RADOS applies one client's operations on an
    object in the order sent.  ``flush`` sends what is gathered and waits:
    when it returns, every write is durable (an OSD acknowledges a write
    once committed).  The caller writes nothing through librbd meanwhile.
    """

    cdef rados_ioctx_t io
    cdef readonly object name
    cdef object ioctx  # keeps the cluster connection alive
    cdef bytes prefix
    cdef uint64_t obj_size, size
    cdef dict pending  # object number -> [rados_write_op_t as int, extents, bytes]
    cdef uint64_t pending_bytes
    cdef rados_completion_t comps[_MAX_OPS_INFLIGHT]
    cdef rados_write_op_t ops[_MAX_OPS_INFLIGHT]
    cdef uint64_t op_bytes[_MAX_OPS_INFLIGHT]
    cdef uint64_t inflight_bytes
    cdef int head, count
    cdef int first_error
    cdef readonly uint64_t operations, extents  # sent so far (for profiles and tests)
    cdef readonly uint64_t completed  # operations reaped (they complete in send order here)

    def __cinit__(self):
        self.io = NULL
        self.head = self.count = 0
        self.first_error = 0
        self.pending = {}
        self.pending_bytes = 0
        self.inflight_bytes = 0
        self.operations = self.extents = 0
        self.completed = 0

    def __init__(self, Image image not None):
        """Use ``Image.object_writer()``, which checks the image is plain first."""
        image._check()
        cdef rbd_image_info_t info
        cdef int ret = rbd_stat(image.image, &info, sizeof(info))
        if ret < 0:
            raise _error(ret, f"stat of RBD image {image.name}")
        self.obj_size, self.size, self.name = info.obj_size, info.size, image.name
        cdef char buf[128]
        ret = rbd_get_block_name_prefix(image.image, buf, sizeof(buf))
        if ret < 0:
            raise _error(ret, f"the object name prefix of RBD image {image.name}")
        self.prefix = <bytes>buf
        ret = rbd_get_id(image.image, buf, sizeof(buf))
        if ret < 0:
            raise _error(ret, f"the id of RBD image {image.name}")
        cdef bytes header = b"rbd_header." + <bytes>buf
        cdef int64_t pool = rbd_get_data_pool_id(image.image)
        if pool < 0:
            raise _error(pool, f"the data pool of RBD image {image.name}")
        cdef IoCtx parent = image.ioctx
        self.ioctx = parent
        with nogil:
            ret = rados_ioctx_create2(parent.cluster.cluster, pool, &self.io)
        if ret < 0:
            self.io = NULL
            raise _error(ret, f"opening the data pool of RBD image {image.name}")
        cdef bytes bns
        if parent.namespace:
            bns = _c(parent.namespace, "namespace")
            rados_ioctx_set_namespace(self.io, bns)
        if parent.full_try:
            rados_set_pool_full_try(self.io)
        self._set_snap_context(header)

    cdef int _set_snap_context(self, bytes header) except -1:
        """The image's snapshot context, as librbd keeps it: every snapshot of the image,
        also those a user does not list (a removed snapshot that clones still use)."""
        cdef int cap = 8 + 4 + 8 * _MAX_SNAPS
        cdef char *out = <char *>malloc(cap)
        if out == NULL:
            raise MemoryError()
        cdef const char *oid = header
        cdef int ret
        try:
            with nogil:
                ret = rados_exec(self.io, oid, b"rbd", b"get_snapcontext", NULL, 0, out, cap)
            if ret < 0:
                raise _error(ret, f"reading the snapshot context of RBD image {self.name}")
            raw = out[:ret]
        finally:
            free(out)
        if len(raw) < 12:
            raise OSError(5, f"RBD image {self.name}: a snapshot context of {len(raw)} bytes")
        seq = int.from_bytes(raw[0:8], "little")
        n = int.from_bytes(raw[8:12], "little")
        if len(raw) != 12 + 8 * n:
            raise OSError(5, f"RBD image {self.name}: a snapshot context of {len(raw)} bytes "
                             f"for {n} snapshots")
        snaps = [int.from_bytes(raw[12 + 8 * i:20 + 8 * i], "little") for i in range(n)]
        if any(s > seq for s in snaps) or snaps != sorted(snaps, reverse=True):
            raise OSError(5, f"RBD image {self.name}: an invalid snapshot context "
                             f"(seq {seq}, snapshots {snaps})")
        cdef rados_snap_t *ids = <rados_snap_t *>malloc(sizeof(rados_snap_t) * (n + 1))
        if ids == NULL:
            raise MemoryError()
        try:
            for i in range(n):
                ids[i] = snaps[i]
            ret = rados_ioctx_selfmanaged_snap_set_write_ctx(self.io, seq, ids, n)
        finally:
            free(ids)
        if ret < 0:
            raise _error(ret, f"setting the snapshot context of RBD image {self.name}")
        return 0

    cdef void _check(self) except *:
        if self.io == NULL:
            raise ValueError(f"the object writer of RBD image {self.name} is closed")

    def write(self, data, uint64_t offset):
        """Gather a write of ``data`` (bytes-like; copied) at ``offset`` of the image."""
        self._check()
        cdef Py_buffer view
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        cdef uint64_t length = <uint64_t>view.len
        cdef const char *p = <const char *>view.buf
        cdef uint64_t objno, inner, n
        cdef rados_write_op_t op
        try:
            if offset > self.size or length > self.size - offset:
                raise ValueError(f"write {offset}+{length} outside RBD image {self.name} "
                                 f"of {self.size} bytes")
            while length:
                objno = offset // self.obj_size
                inner = offset % self.obj_size
                n = min(length, self.obj_size - inner)
                entry = self.pending.get(objno)
                if entry is None:
                    op = rados_create_write_op()
                    if op == NULL:
                        raise MemoryError()
                    entry = self.pending[objno] = [<size_t>op, 0, 0]
                op = <rados_write_op_t><size_t>entry[0]
                rados_write_op_write(op, p, <size_t>n, inner)  # copies the bytes
                entry[1] += 1
                entry[2] += n
                self.pending_bytes += n
                if entry[1] >= _OP_MAX_EXTENTS or entry[2] >= self.obj_size:
                    del self.pending[objno]
                    self._send(objno, entry)
                p += n
                offset += n
                length -= n
        finally:
            PyBuffer_Release(&view)
        if self.pending_bytes >= OBJECT_WRITER_PENDING_BYTES:
            self.send_all()

    cdef int _send(self, uint64_t objno, list entry) except -1:
        """Send one object's gathered operation (waiting for room in flight)."""
        cdef rados_write_op_t op = <rados_write_op_t><size_t>entry[0]
        cdef uint64_t nbytes = entry[2]
        self.pending_bytes -= nbytes
        while self.count == _MAX_OPS_INFLIGHT or (
                self.count and self.inflight_bytes + nbytes > OBJECT_BYTES_INFLIGHT):
            self._reap_one()
        cdef bytes boid = self.prefix + b".%016x" % objno
        cdef const char *oid = boid
        cdef rados_completion_t c = NULL
        cdef int ret = rados_aio_create_completion2(NULL, NULL, &c)
        if ret < 0:
            rados_release_write_op(op)
            raise _error(ret, f"rados_aio_create_completion2 for {self.name}")
        with nogil:
            ret = rados_aio_write_op_operate(op, self.io, c, oid, NULL, 0)
        if ret < 0:
            rados_aio_release(c)
            rados_release_write_op(op)
            raise _error(ret, f"writing object {boid.decode()} of RBD image {self.name}")
        cdef int slot = (self.head + self.count) % _MAX_OPS_INFLIGHT
        self.comps[slot] = c
        self.ops[slot] = op
        self.op_bytes[slot] = nbytes
        self.inflight_bytes += nbytes
        self.count += 1
        self.operations += 1
        self.extents += entry[1]
        return 0

    cdef int _reap_one(self) except -1:
        cdef rados_completion_t c = self.comps[self.head]
        cdef int r
        with nogil:
            rados_aio_wait_for_complete(c)
            r = rados_aio_get_return_value(c)
            rados_aio_release(c)
            rados_release_write_op(self.ops[self.head])
        self.inflight_bytes -= self.op_bytes[self.head]
        self.head = (self.head + 1) % _MAX_OPS_INFLIGHT
        self.count -= 1
        self.completed += 1
        if r < 0 and self.first_error == 0:
            self.first_error = r
        return 0

    def send_before(self, uint64_t offset):
        """Send the gathered operation of every object that ends at or before ``offset``.

        For a stream of writes in offset order (a full cycle): nothing more will
        come for those objects, so their operations go out now, not when 64 MiB
        are gathered, and the OSD gets a steady stream instead of bursts.  (A
        later write to such an object would simply be one more operation.)
        """
        self._check()
        if not self.pending:
            return
        cdef uint64_t limit = offset // self.obj_size
        ready = sorted(k for k in self.pending if k < limit)
        for objno in ready:
            self._send(objno, self.pending.pop(objno))

    def mark(self):
        """Send everything gathered, without waiting; return a mark for ``reached``.

        The writes so far are durable once ``reached(mark)`` is True: an
        asynchronous checkpoint, while more writes go on being sent.
        """
        self.send_all()
        return self.operations

    def reached(self, uint64_t mark, bint wait=False):
        """Whether every operation sent before ``mark`` (from ``mark()``) has completed
        (with ``wait``: wait until it has).  Reaps what has completed, oldest first;
        a failure of any operation reaped is raised (OSError with librados' errno)."""
        self._check()
        while self.completed < mark and self.count:
            if not wait and not rados_aio_is_complete(self.comps[self.head]):
                break
            self._reap_one()
        cdef int err = self.first_error
        if err:
            self.first_error = 0
            raise _error(err, f"writing RBD image {self.name}")
        return self.completed >= mark

    def send_all(self):
        """Send every gathered operation (in object order), without waiting for them."""
        self._check()
        pending, self.pending = self.pending, {}
        order = sorted(pending)
        cdef Py_ssize_t k = 0
        try:
            for k in range(len(order)):
                self._send(order[k], pending.pop(order[k]))
        finally:  # a send failed: the operations not sent are dropped (the caller fails)
            for entry in pending.values():
                self.pending_bytes -= entry[2]
                rados_release_write_op(<rados_write_op_t><size_t>entry[0])

    def flush(self):
        """Send everything gathered and wait: every write so far is durable; a failure
        of any of them is raised (OSError with librados' errno)."""
        self.send_all()
        while self.count:
            self._reap_one()
        cdef int err = self.first_error
        if err:
            self.first_error = 0
            raise _error(err, f"writing RBD image {self.name}")

    def close(self):
        """Drop what is gathered and not sent, wait for what is in flight, close."""
        for entry in self.pending.values():
            rados_release_write_op(<rados_write_op_t><size_t>entry[0])
        self.pending = {}
        self.pending_bytes = 0
        while self.count:
            self._reap_one()
        if self.io != NULL:
            rados_ioctx_destroy(self.io)
            self.io = NULL

    def __dealloc__(self):
        for entry in self.pending.values():
            rados_release_write_op(<rados_write_op_t><size_t>entry[0])
        while self.count:
            rados_aio_wait_for_complete(self.comps[self.head])
            rados_aio_release(self.comps[self.head])
            rados_release_write_op(self.ops[self.head])
            self.head = (self.head + 1) % _MAX_OPS_INFLIGHT
            self.count -= 1
        if self.io != NULL:
            rados_ioctx_destroy(self.io)
            self.io = NULL
