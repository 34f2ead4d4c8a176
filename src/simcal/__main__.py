"""``python -m simcal``: the console script."""

from simcal.launch import entry

entry()
