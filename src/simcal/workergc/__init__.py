"""Garbage collection in the local worker server: off while it imports, frozen before it forks.

Every local worker is forked from one server that imported distributed, simcal and the
model's packages (:mod:`simcal.workerstart`). Python's advice for such a server is followed
(the :func:`gc.freeze` documentation): no collection while it imports (this module, imported
first), and every object it made moved to the permanent generation before the first fork
(:mod:`simcal.workergc.frozen`, imported last), with collection back on. A worker's full
collections then skip the hundreds of thousands of objects it inherited (a Starsim model's
server holds about 430,000; one full collection over them took 0.13-0.15 s, one in every
30 to 60 simulations) and never write to their pages, which stay shared with the server.

Imported only through the server's preload list (:func:`simcal.workerstart._preload_list`),
as its first and last entries: importing a module is all ``multiprocessing.forkserver`` can
be asked to do before it forks.
"""

from __future__ import annotations

import gc

gc.disable()
