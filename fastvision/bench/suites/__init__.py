"""One benchmark module per op family; each registers its suites on import.

A new family adds ``suites/<family>.py`` (calling ``core.register(Suite(...))``
for each op it benchmarks) and its name to :data:`FAMILIES` below.
"""

from __future__ import annotations

import importlib

#: The op families with a benchmark module here, in the order their suites run.
FAMILIES = ("selective_scan", "neighborhood", "criss_cross", "super_token", "masks", "deform_conv", "dcn",
            "deform_attn")


def load() -> None:
    """Imports every family's module (registering its suites); idempotent."""
    for family in FAMILIES:
        importlib.import_module(f"{__name__}.{family}")
