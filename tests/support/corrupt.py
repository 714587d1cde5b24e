"""Silent corruption for verify and scrub tests: bytes changed behind a daemon's back."""

import os


def flip(path, offsets, mask: int = 0x5A) -> None:
    """Flip the bits of ``mask`` in one byte at each offset of the file, durably."""
    with open(path, "r+b") as f:
        for off in offsets:
            f.seek(off)
            b = f.read(1)
            f.seek(off)
            f.write(bytes([b[0] ^ mask]))
        f.flush()
        os.fsync(f.fileno())
