"""``simcal bench``: simcal measured side by side with the regression it exists to prevent.

Modules, one job each:

- :mod:`~simcal.bench.strategies`: the gather strategies (baselines and simcal's)
- :mod:`~simcal.bench.workload`: the synthetic workload and its ideal throughput
- :mod:`~simcal.bench.gather_bench`: per-future gather cost on finished futures
- :mod:`~simcal.bench.throughput`: calibration throughput by mode
- :mod:`~simcal.bench.raw_dask`: the same replicate tasks with no optimizer
- :mod:`~simcal.bench.optimizer_cost`: Optuna ask+tell time as the study grows
- :mod:`~simcal.bench.checks`: the performance targets, checked against one run
- :mod:`~simcal.bench.suite`: the settings (quick, default, full) and the run order
- :mod:`~simcal.bench.markdown`: the markdown report (and the JSON and PNG beside it)
- :mod:`~simcal.bench.cli`: the ``bench`` subcommand
"""
