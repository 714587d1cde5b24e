"""What to ship to one target this cycle: a pure decision, no I/O.

The driver asks ``decide`` once per target and cycle, after connecting (or on
a live link), and then does what the ``Decision`` says.  Everything the
decision needs is passed in: what we recorded about the target
(``TargetRecord``), what we track in memory (the cycle we believe it holds,
whether we know its owed blocks), and, after a new connection, what the target
said in ``opened`` (``TargetView``).  The cases, each pinned by a row of the
table in tests/test_sender_plan.py:

* The target has no image: a **full** copy (the only time one is sent).
* It already holds this cycle or a newer one: **skip**; record it as held,
  unless tracking cannot be trusted, then compare hashes in the next cycle.
* Tracking cannot be trusted (our state was lost, another store answers at
  the address, the target went back in time, or we never knew it): **compare**
  block hashes and ship only what differs.  Never a full copy.
* Otherwise a **delta** of the owed blocks (a **full** copy if we owe it
  everything, i.e. it never held a cycle).
* **Resume** after the target's acknowledged chunk only when it holds part of
  this very cycle, we were shipping this very cycle to it, of the same kind
  (full or delta), and the frozen image was durable before the first chunk
  left (else the chunks it holds may hold writes a crash took from us).
"""

from __future__ import annotations

from dataclasses import dataclass

from cyclemirror.sender.persist import TargetRecord

SKIP, FULL, DELTA, COMPARE = "skip", "full", "delta", "compare"


@dataclass(frozen=True)
class TargetView:
    """What the target said when the link opened."""

    node_id: str
    held_cycle: int  # the newest cycle it applied (or that the link saw applied)
    has_image: bool
    pending_cycle: int  # a partly received cycle (0: none)


@dataclass(frozen=True)
class Decision:
    action: str  # SKIP, FULL, DELTA or COMPARE
    resume: bool = False  # resume after the target's acknowledged chunk
    distrust: bool = False  # SKIP only: compare block hashes at the next cycle

    @property
    def ships(self) -> bool:
        return self.action != SKIP


def decide(record: TargetRecord, known_held: int, owed_known: bool, cycle: int,
           target: TargetView | None) -> Decision:
    """The plan for shipping ``cycle`` to one target.

    ``known_held``: the cycle the driver believes the target holds; ``owed_known``:
    the driver has an owed bitmap for it (False: it owes everything);
    ``target``: None on a live link (nothing new was learnt), else the
    ``opened`` reply of a new connection.
    """
    if target is None:
        # A live link: the target is what we have tracked on it.
        return Decision(DELTA if owed_known else FULL)
    compare = record.untrusted
    if record.target_node not in (None, target.node_id):
        compare = True  # another store answers at that address
    if target.held_cycle < known_held or (known_held == 0 and not owed_known
                                           and record.target_node is None):
        compare = True  # it went back in time, or we never knew it
    if not target.has_image:
        action = FULL
    elif target.held_cycle >= cycle:
        return Decision(SKIP, distrust=compare)
    elif compare:
        return Decision(COMPARE)
    else:
        action = DELTA if owed_known else FULL
    resume = (target.pending_cycle == cycle and record.in_flight == cycle
              and record.in_flight_full == (action == FULL) and record.in_flight_synced)
    return Decision(action, resume=resume)
