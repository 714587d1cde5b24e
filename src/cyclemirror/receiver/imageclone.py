"""A plain file from an incoming mirror image: ``mirror clone SOURCE/NAME PATH``.

For a file object's mirror (docs/files.md), whose image on the target is the
file as of the last applied cycle, and for a volume's too: the image is
pinned (``readers.PinnedImage``: an apply that comes meanwhile goes into a
copy of its own, ``receiver.mirror``), copied with the kernel to a hidden
name beside ``PATH`` (``fileops.copy_sparse``: a reflink where the file
system has one, XFS or btrfs, so constant space; elsewhere a sparse copy of
the data), made durable, unpinned, and renamed to ``PATH`` with
``RENAME_NOREPLACE``: ``PATH`` is absent or the whole image of one cycle.
The file is the user's: ``file add NAME PATH`` makes it a file object of this
store (on XFS with reflink or btrfs), qemu opens it as a raw image.  The
image's cycles keep applying throughout; nothing written to the file reaches
the image.  ``PATH`` is checked as a tree clone's is (``treeclone.check_dest``).
"""

from __future__ import annotations

import logging
import os
import secrets
import time

from cyclemirror.errors import AlreadyExistsError, NotFoundError, UsageError
from cyclemirror.receiver import treeops
from cyclemirror.receiver.clone import copy_pinned
from cyclemirror.receiver.readers import mirror_images
from cyclemirror.receiver.treeclone import WORK_PREFIX, check_dest

log = logging.getLogger(__name__)


def find_image(root: str, source: str, mirror: str):
    """The incoming image ``SOURCE/MIRROR`` with an applied cycle, or None."""
    images = [im for im in mirror_images(root)
              if im.volume == mirror and source in (im.node_id, im.node_name)]
    if len({im.node_id for im in images}) > 1:
        raise UsageError(f"{source}/{mirror}: the name {source} belongs to several source "
                         "nodes; name the source by its node id")
    return images[0] if images else None


def clone_image_to_file(store, source: str, mirror: str, dest: object) -> dict:
    t0 = time.monotonic()
    root = os.fspath(store.path)
    what = f"clone of mirror image {source}/{mirror} to a file"
    image = find_image(root, source, mirror)
    if image is None:
        raise NotFoundError(f"no incoming mirror image {source}/{mirror} with an applied cycle "
                            "in this store")
    if image.backend != "file":
        raise UsageError(f"{source}/{mirror} is an RBD image; a clone to a file is made from "
                         "an image file only (rbd export its last cyclemirror-N snapshot)")
    real = check_dest(root, dest, what)
    parent, leaf = os.path.split(real)
    work = os.path.join(parent, f"{WORK_PREFIX}{leaf}-{secrets.token_hex(4)}")
    cycle = copy_pinned(image, work)
    pfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            treeops.renameat2(pfd, os.path.basename(work), pfd, leaf, treeops.RENAME_NOREPLACE)
        except FileExistsError:
            _unlink(work)
            raise AlreadyExistsError(f"{what}: {dest} appeared meanwhile; nothing was "
                                     "changed") from None
        os.fsync(pfd)
    finally:
        os.close(pfd)
    seconds = time.monotonic() - t0
    log.info("cloned incoming image %s/%s at cycle %d to file %s (%.3fs)", source, mirror,
             cycle, real, seconds)
    return {"kind": "file", "source_node": image.node_id, "source_name": image.node_name,
            "mirror": mirror, "cycle": cycle, "path": real, "size": image.size,
            "block_size": image.block_size, "seconds": seconds}


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
