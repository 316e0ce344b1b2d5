"""The docs site builds with warnings as errors (``mkdocs build --strict``: broken
links, unknown anchors, docstrings griffe cannot read), and has a page per op family
of the registry (its README section, migration table and API), the models and the
benchmarks."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mkdocs")
pytest.importorskip("mkdocstrings_handlers.python")

from fastvision.bench.suites import FAMILIES  # noqa: E402
from fastvision.models.registry import MODELS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                            cwd=ROOT, capture_output=True, text=True, env={"NO_MKDOCS_2_WARNING": "1",
                                                                           **__import__("os").environ})
    assert result.returncode == 0, result.stderr[-5000:]
    return out


def _text(path):
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", path.read_text()))


@pytest.mark.parametrize("family", FAMILIES)
def test_a_page_per_family(site, family):
    page = site / "ops" / family / "index.html"
    html = page.read_text()
    assert "Semantics" in html and "Migration" in html, f"{family}: no semantics or migration table"
    assert html.count('class="doc doc-heading"') >= 1, f"{family}: no API rendered from docstrings"
    assert "<table" in html


def test_models_and_benchmarks_pages(site):
    models = _text(site / "models" / "index.html")
    for name in MODELS:
        assert name in models
    assert "load_official" in models
    bench = (site / "benchmarks" / "index.html").read_text()
    assert "<img" in bench and "<table" in bench
    for img in re.findall(r'<img[^>]+src="([^"]+)"', bench):
        assert (site / "benchmarks" / img).resolve().exists(), img
    index = _text(site / "index.html")
    assert "pip install fastvision -f" in index and "fastvision info" in index
