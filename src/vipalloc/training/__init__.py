"""The CPU RL trainer, its warm-up, evaluation, demo and reports (see docs/training.md).

Importing the package asks OpenMP to let idle threads sleep (``OMP_WAIT_POLICY=PASSIVE``, unless the environment
already sets it) before torch starts its thread pool: the trainer and its warm-up use a fixed number of torch
threads, and on a machine shared with other jobs spinning threads would wait for cores other processes hold (the
warm-up then slowed many-fold). The policy changes no number, only how idle threads wait. It takes effect when
this package is imported before torch, as the ``vipalloc`` commands and the trainer's worker processes do.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
