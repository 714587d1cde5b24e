"""Where each target of a mirror stands on a sync: one rule for volumes and trees.

``mirror sync`` (docs/cli.md) waits for the cycle it asked for on the targets
it names, until the deadline, whatever happens to the others; without names,
on every target that is not broken, leaving out one that breaks or is put in a
break meanwhile, and one that is *down* (its attempt at this cycle or a later
one failed and it is retrying, and it does not hold the cycle yet) once
another target applied the cycle.  A target that is merely slow is waited
for.  The volume driver (``sender.driver``) and the tree driver
(``sender.treedriver``) both look at their targets with ``look`` under their
own lock, at each wake-up, and raise their own errors from what it finds.

A target here is anything with ``label``, ``broken`` (the error that broke it,
or None), ``paused`` (in a break), ``backoff`` (> 0 while retrying),
``failed_cycle`` and ``last_error``; the caller says which cycle it applied
and which it holds (committed, for volumes; the same for trees).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Standing:
    applied: list = field(default_factory=list)  # hold the cycle applied
    pending: list = field(default_factory=list)  # waited for
    down: dict[str, str] = field(default_factory=dict)  # label -> why; left out once one applied
    left_out: dict[str, str] = field(default_factory=dict)  # broke or in a break: label -> why
    named_broken: object = None  # a named target that broke: the caller raises its error

    @property
    def done(self) -> bool:
        """Nothing left to wait for: every target applied, or only down ones lack it
        and another one applied it."""
        return self.named_broken is None and not self.pending and \
            (bool(self.applied) or not self.down)


def look(waited: list, want: int, named: bool, applied: Callable[[object], int],
         held: Callable[[object], int], gone: Callable[[object], bool] = lambda r: False
         ) -> Standing:
    """Where each of ``waited`` stands on cycle ``want`` (``named``: the user named them)."""
    s = Standing()
    for r in waited:
        if applied(r) >= want:
            s.applied.append(r)
        elif r.broken is not None or gone(r):
            if named:
                s.named_broken = r
                return s
            s.left_out[r.label] = f"broken: {r.last_error}"
        elif r.paused and not named:
            s.left_out[r.label] = "broken (mirror break)"
        elif not named and r.backoff > 0 and r.failed_cycle >= want and held(r) < want:
            s.down[r.label] = f"down, retrying ({r.last_error})"
        else:
            s.pending.append(r)
    return s
