"""Test failover: a writable volume from an incoming image while mirroring into it goes on.

``clone(store, source, mirror, name)`` pins the image (an apply that comes
meanwhile goes into a copy of its own, ``receiver.mirror``), copies the image
of the latest applied cycle with the kernel (``copy_sparse``: a reflink where
the file system has one, XFS or btrfs; a sparse copy of the allocated data
elsewhere, e.g. ext4), unpins, and lets the store adopt the copy as volume
``name`` (``Store.adopt_image``).  The clone is an ordinary volume: writable
over NBD, its writes never reach the image, ``volume rm NAME`` removes it.
The image's cycles keep applying throughout.  An image kept in RBD is cloned
inside the cluster instead (``receiver.rbdvolumes``).
"""

from __future__ import annotations

import logging
import os
import time

from cyclemirror.errors import AlreadyExistsError, NotFoundError, UsageError
from cyclemirror.receiver import fileops
from cyclemirror.receiver.readers import PinnedImage, mirror_images
from cyclemirror.store.names import validate_volume_name

log = logging.getLogger(__name__)
WORK_PREFIX = ".clone-"


def clone(store, source: str, mirror: str, name: str, rbd=None) -> dict:
    t0 = time.monotonic()
    root = os.fspath(store.path)
    name = validate_volume_name(name)
    images = [im for im in mirror_images(root)
              if im.volume == mirror and source in (im.node_id, im.node_name)]
    if not images:
        known = sorted({f"{im.node_name or im.node_id}/{im.volume}" for im in mirror_images(root)})
        raise NotFoundError(f"no incoming mirror image {source}/{mirror} with an applied cycle "
                            f"in this store (images: {', '.join(known) or 'none'})")
    if len({im.node_id for im in images}) > 1:
        raise UsageError(f"{source}/{mirror}: the name {source} belongs to several source "
                         "nodes; name the source by its node id")
    image = images[0]
    if image.backend != "file":  # an RBD clone of its last cycle snapshot
        from cyclemirror.receiver import rbdvolumes

        return rbdvolumes.clone(store, rbd, image, name)
    if name in store.list_volumes():
        raise AlreadyExistsError(f"volume {name!r} already exists in this store; pick another "
                                 "name for the clone")
    ndir = os.path.dirname(image.image_path)
    work = os.path.join(ndir, WORK_PREFIX + name)
    copy = work + ".img"
    cycle = copy_pinned(image, copy)
    vol = store.adopt_image(name, copy, image.block_size, 0, work)
    seconds = time.monotonic() - t0
    log.info("cloned incoming image %s/%s at cycle %d to volume %s (%.3fs)", source, mirror,
             cycle, name, seconds)
    return {"volume": vol.name, "source_node": image.node_id, "source_name": image.node_name,
            "mirror": mirror, "cycle": cycle, "size": vol.size, "block_size": vol.block_size,
            "seconds": seconds}


def copy_pinned(image, dest: str) -> int:
    """Copy the image file of ``image`` to ``dest`` (reflinks where the file system has
    them, else a sparse copy) and fsync it, the image pinned meanwhile so no cycle applies
    into it; the applied cycle the copy holds.  ``dest`` is removed if the copy fails."""
    pin = PinnedImage(image)
    try:
        fileops.copy_sparse(image.image_path, dest)
        fd = os.open(dest, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return pin.applied_cycle
    except BaseException:
        try:
            os.unlink(dest)
        except FileNotFoundError:
            pass
        raise
    finally:
        pin.release()
