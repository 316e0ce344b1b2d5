"""Benchmarks: the machinery behind ``fastvision bench`` and ``bench/``.

* :mod:`.core`: :class:`Case`, :class:`Impl`, :class:`Suite`, the registry
  (:data:`SUITES`), timing, peak memory, the environment record and :func:`run`;
* :mod:`.report`: text tables, JSON, the speedup plot;
* :mod:`.suites`: one module per op family (``suites/<family>.py``), listed in
  ``suites.FAMILIES``; importing this package registers them all.
"""

from __future__ import annotations

from . import suites as _suites
from .core import (DTYPES, REFERENCE, SUITES, TINY_ENV, Case, Impl, Planned, Suite, busy_threads, cases,
                   cpu_name, device_name, environment, fastvision_backends, fwd_bwd, implementations,
                   peak_bandwidth, plan, plan_case, register, run, tiny_mode, usable_backends, validate)
from .report import format_tables, plot, pyplot, write_json

_suites.load()

__all__ = ["DTYPES", "REFERENCE", "SUITES", "TINY_ENV", "Case", "Impl", "Planned", "Suite", "busy_threads",
           "cases", "cpu_name", "device_name", "environment", "fastvision_backends", "format_tables", "fwd_bwd",
           "implementations", "peak_bandwidth", "plan", "plan_case", "plot", "pyplot", "register", "run",
           "tiny_mode", "usable_backends", "validate", "write_json"]
