"""The RPO objective: is a target keeping up, and when should the next freeze come?

Pure functions of measured figures, so every case is a row of a table test
(tests/test_sender_rpo.py); the driver only feeds them and acts on the answer.

Words.  The *RPO age* of a target is now minus the freeze time of the newest
cycle it applied.  It grows by one second per second until the next cycle is
applied, then drops to that cycle's *latency* (its apply time minus its
freeze time).  So the worst age before the next apply is about
``age + latency(owed bytes)``, and with freezes every ``interval`` seconds
the age peaks at about ``interval + latency``.

* ``LatencyModel`` learns ``latency(bytes) = base + bytes / rate`` from the
  cycles applied so far (exponentially weighted: recent cycles count most).
* ``assess`` says ``ok``, ``at_risk`` (the predicted worst age passes the
  objective) or ``violated`` (the age already did), with hysteresis: a state
  is left only when the figure is back below ``HYSTERESIS`` of the objective,
  so a target hovering at the line does not flap.
* ``auto_interval`` picks the wait between freezes: none while a target is at
  risk or violated (back to back), otherwise the longest wait that keeps the
  predicted peak age at ``HEADROOM`` of the objective: a quiet volume is frozen
  (and merged) rarely, a busy one as often as its cycles allow.
* ``pace_limit`` (``mirror start --pace``) is the write rate the volume's
  writers are held to when back-to-back cycles are not enough: none while the
  predicted age is under ``PACE_FROM`` of the objective (above ``HEADROOM``), then a limit that
  falls from twice the *sustainable* rate (what the measured copy rate can
  ship with the peak age at ``HEADROOM`` of the objective) to a quarter of it
  as the prediction passes the objective, never below ``PACE_FLOOR``.
"""

from __future__ import annotations

from dataclasses import dataclass

OK, AT_RISK, VIOLATED = "ok", "at_risk", "violated"
STATES = (OK, AT_RISK, VIOLATED)
HYSTERESIS = 0.8  # leave at_risk / violated only below this share of the objective
HEADROOM = 0.6  # auto_interval aims the peak age at this share of the objective
WEIGHT = 0.3  # of the newest cycle in the moving averages
MIN_RATE_BYTES = 1 << 20  # cycles smaller than this teach the base latency, not the rate
DEFAULT_BASE = 0.2  # seconds, before any cycle was measured
# Pacing starts when the predicted age passes this share of the objective: above HEADROOM,
# where auto_interval aims the peaks, so a mirror that merely waits between freezes is not paced.
PACE_FROM = 0.7
PACE_FLOOR = 1 << 20  # bytes/s: pacing slows writers, it never stops them
PROVISIONAL_AFTER = 0.3  # seconds of a cycle on its way before its rate stands in for the model's


@dataclass
class LatencyModel:
    """latency(bytes) = base + bytes / rate, learnt from applied cycles."""

    base: float = DEFAULT_BASE
    rate: float | None = None  # bytes per second of a cycle's work; None: not measured yet

    def observe(self, nbytes: int, latency: float) -> None:
        """Learn from one applied cycle: ``nbytes`` shipped, applied ``latency`` s after its freeze."""
        if latency <= 0:
            return
        if nbytes < MIN_RATE_BYTES:
            self.base += WEIGHT * (latency - self.base)
            return
        work = max(latency - self.base, latency * 0.1)
        rate = nbytes / work
        self.rate = rate if self.rate is None else self.rate + WEIGHT * (rate - self.rate)

    def latency(self, nbytes: int) -> float:
        if self.rate is None or nbytes <= 0:
            return self.base
        return self.base + nbytes / self.rate


@dataclass(frozen=True)
class Assessment:
    state: str  # OK, AT_RISK or VIOLATED
    predicted: float  # worst RPO age expected before the next apply, seconds
    reason: str  # one line for people and monitoring systems


def assess(objective: float, age: float | None, owed_bytes: int, model: LatencyModel,
           previous: str = OK) -> Assessment:
    """The state of one target against ``objective`` seconds.

    ``age``: its RPO age now (None: it never applied a cycle; that is at risk
    until the first cycle lands).  ``owed_bytes``: what it still has to receive.
    """
    if age is None:
        predicted = model.latency(owed_bytes)
        return Assessment(AT_RISK, predicted,
                          f"no cycle applied yet; the first is expected in {predicted:.1f}s")
    predicted = age + model.latency(owed_bytes)
    calm = HYSTERESIS * objective
    if age > objective or (previous == VIOLATED and age > calm):
        return Assessment(VIOLATED, predicted,
                          f"RPO age {age:.1f}s is over the objective {objective:g}s")
    if predicted > objective or (previous in (AT_RISK, VIOLATED) and predicted > calm):
        why = f"{_size(owed_bytes)} owed" + (
            f" at {_size(model.rate)}/s" if model.rate else "")
        return Assessment(AT_RISK, predicted,
                          f"predicted RPO age {predicted:.1f}s is over the objective "
                          f"{objective:g}s ({why})")
    return Assessment(OK, predicted,
                      f"RPO age {age:.1f}s, predicted {predicted:.1f}s, objective {objective:g}s")


def auto_interval(objective: float, model: LatencyModel, owed_bytes: int, states: list[str],
                  cap: float | None = None) -> float:
    """Seconds from one freeze to the next for an RPO ``objective`` (see the module text).

    ``states``: every target's current state; ``cap``: a user's ``--interval``,
    which the wait never exceeds.
    """
    if any(s != OK for s in states):
        return 0.0
    wait = HEADROOM * objective - model.latency(owed_bytes)
    if cap is not None:
        wait = min(wait, cap)
    return max(0.0, wait)


def sustainable_rate(objective: float, model: LatencyModel) -> float | None:
    """The write rate (bytes/s) that back-to-back cycles ship with the peak RPO age at
    ``HEADROOM`` of the objective; None until a cycle's rate was measured.

    Back to back, a cycle carries what was written while the previous one ran:
    its time T = base + W * T / rate, so T = base / (1 - W / rate), and the age
    peaks at 2T just before an apply.  2T <= HEADROOM * objective gives
    W <= rate * (1 - 2 * base / (HEADROOM * objective)), kept at least a tenth
    of the rate for objectives too short for the base latency.
    """
    if model.rate is None:
        return None
    share = 1.0 - 2.0 * model.base / (HEADROOM * objective)
    return model.rate * max(0.1, share)


def provisional(model: LatencyModel, done_bytes: int, seconds: float) -> LatencyModel:
    """The model, or while it has no rate yet (no big cycle applied so far) one that takes
    the rate of the cycle on its way: ``done_bytes`` shipped in ``seconds``.

    Pacing needs a rate the moment a first big delta shows the mirror cannot keep
    up, not once that delta is applied.
    """
    if model.rate is not None or seconds < PROVISIONAL_AFTER or done_bytes < MIN_RATE_BYTES:
        return model
    return LatencyModel(base=model.base, rate=done_bytes / seconds)


def pace_limit(objective: float, age: float | None, owed_bytes: int,
               model: LatencyModel) -> float | None:
    """The rate (bytes/s) to hold the volume's writers to for one target, or None (no limit).

    ``age`` None (no cycle applied yet: the first full copy) never paces: an
    objective means nothing before the first cycle lands, and holding writers
    for a whole first copy is not what anybody asked for.
    """
    sustainable = sustainable_rate(objective, model)
    if age is None or sustainable is None:
        return None
    p = (age + model.latency(owed_bytes)) / objective
    if p < PACE_FROM:
        return None
    if p < 1.0:  # from 2x at PACE_FROM down to 1x at the objective
        factor = 2.0 - (p - PACE_FROM) / (1.0 - PACE_FROM)
    else:  # past it: down to a quarter, so the mirror catches up
        factor = max(0.25, 1.0 - (p - 1.0))
    return max(float(PACE_FLOOR), sustainable * factor)


def worst(states: list[str]) -> str:
    """The worst of several states (ok < at_risk < violated); OK for none."""
    return max(states, key=STATES.index, default=OK)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
