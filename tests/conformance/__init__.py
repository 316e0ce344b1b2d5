"""Conformance specs, one module per op family, each defining ``SPECS`` (a list of
:class:`fastvision.testing.OpSpec`).

tests/test_conformance.py runs every generic check on every spec found here:
adding a family means adding a module here, nothing else.
"""

import importlib
import pkgutil


def all_specs() -> list:
    specs = []
    for module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        specs += importlib.import_module(f"{__name__}.{module.name}").SPECS
    names = [s.name for s in specs]
    assert len(names) == len(set(names)), f"spec names must be unique: {names}"
    return specs
