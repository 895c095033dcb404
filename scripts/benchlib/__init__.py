"""What ``scripts/bench.py`` and ``scripts/bench_data.py`` are built from.

Shared by both: ``load`` (the machine's other load, from ``/proc``), ``rounds`` (the
round-robin that interleaves what is compared), ``timing`` (step-time statistics) and
``report`` (markdown tables, JSON, the run's revision and date).

The step benchmark (``bench.py``): ``rows`` (what is timed and the ratios between rows),
``steps`` (the in-process runners), ``authors`` (the authors' functional step), ``workers``
(rows in processes of their own), ``probes`` (memory and page faults in fresh processes) and
``results`` (its tables). The data benchmark (``bench_data.py``): ``loaders`` and ``epochs``.
"""
