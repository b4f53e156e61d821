"""Process-wide CPU runtime defaults, applied before torch is first imported.

OpenMP's wait policy decides what torch's worker threads do between two parallel regions. A
decode step of a 135M model is ~1,000 small ops back to back, so the policy matters:

- ``OMP_WAIT_POLICY=PASSIVE`` (sleep at once): every op pays a thread wake-up. Measured here
  (2-core EPYC, torch 2.13 / libgomp): a rank-8 LoRA product pair at two rows costs 34 µs
  instead of 10 µs; a two-adapter decode step pays it ~420 times.
- libgomp's default (spin ~300,000 iterations, then sleep): fast when the machine is idle, but
  spinning threads starve each other on a shared CPU — one two-expert generation took 80 s
  instead of 4 s next to two busy processes.
- ``GOMP_SPINCOUNT=1000`` (spin briefly, then sleep): the idle speed of spinning (11 µs for the
  same pair) and, next to two busy processes, the same time as ``PASSIVE``.

So the default is the short spin. A user who sets ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT``
keeps their choice; the variables only take effect if set before torch (libgomp) loads, which is
why the ``expertmix`` packages apply this at import and never import torch at module level.
Measurements: docs/performance.md ("OpenMP wait policy").
"""

from __future__ import annotations

import os

__all__ = ["SPINCOUNT", "openmp_defaults"]

SPINCOUNT = "1000"


def openmp_defaults() -> None:
    """Set ``GOMP_SPINCOUNT`` unless the user chose a wait policy or spin count."""
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = SPINCOUNT
