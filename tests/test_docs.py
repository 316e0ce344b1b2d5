"""The project explains itself: every public op and layer has type hints and a
docstring example that runs, and the README points only inside the repository."""

import doctest
import inspect
import pathlib
import re

import pytest

import fastvision.ops

ROOT = pathlib.Path(__file__).resolve().parents[1]
PUBLIC = [name for name in fastvision.ops.__all__ if name != "scan_chunk_len"]


@pytest.mark.parametrize("name", PUBLIC)
def test_public_api_has_type_hints_and_a_runnable_example(name):
    obj = getattr(fastvision.ops, name)
    target = obj.__init__ if inspect.isclass(obj) else obj
    params = [p for p in inspect.signature(target).parameters.values()
              if p.name not in ("self", "device", "dtype", "inference_params")]
    missing = [p.name for p in params if p.annotation is inspect.Parameter.empty]
    assert not missing, f"{name}: parameters without type hints: {missing}"
    assert "Example" in (obj.__doc__ or ""), f"{name}: no example in its docstring"
    finder = doctest.DocTestFinder(recurse=False)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    tests = [t for t in finder.find(obj, name, globs={}) if t.examples]
    assert tests, f"{name}: the example is not a doctest"
    for test in tests:
        runner.run(test)
    assert runner.failures == 0, f"{name}: its docstring example fails"


def test_readme_and_docs_point_inside_the_repository():
    for path in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        text = path.read_text()
        assert "../" not in re.sub(r"https?://\S+", "", text), f"{path.name} points outside the repository"
        for link in re.findall(r"\]\(([^)#]+)\)", text):
            if not link.startswith("http"):
                assert (path.parent / link).exists(), f"{path.name}: broken link {link}"
