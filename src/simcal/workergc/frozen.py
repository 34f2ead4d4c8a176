"""The worker server's last preload: what it imported moves to the permanent generation.

See :mod:`simcal.workergc`. Collection is on again afterwards, in the server and in every
worker forked from it.
"""

from __future__ import annotations

import gc

gc.freeze()
gc.enable()
