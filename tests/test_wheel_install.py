"""The built CPU wheel in a fresh virtualenv with another torch: it installs, imports,
runs an op equal to the reference, and the tests that need torchvision (marked
``torchvision``: timm, torchvision parity) pass there.

The wheel comes from ``tools/build_wheels.py --cpu --out DIR``; this module runs when
``FASTVISION_WHEELS=DIR`` is set (``.ci/run`` builds the wheel and runs it; in the
README's test command it is skipped, as the wheel is not built there). The venv's
torch is ``FASTVISION_WHEEL_TORCH`` (default ``torch==2.14.1 torchvision==0.29.1``,
the CUDA build on this machine's disk, where the project's own venv has torch 2.13
CPU); the venv is made once per ``FASTVISION_WHEEL_VENV`` directory (default: a
temporary one) so reruns need not reinstall torch.

``FASTVISION_WHEEL_PYTHONS`` (interpreters, separated by spaces) adds a venv per
interpreter (torch from the package registry: another CPython has no torch on this
disk; about 4 GB each) in which the same abi3 wheel must run the op.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WHEELS = os.environ.get("FASTVISION_WHEELS")
TORCH = os.environ.get("FASTVISION_WHEEL_TORCH", "torch==2.14.1 torchvision==0.29.1").split()
PYTHONS = os.environ.get("FASTVISION_WHEEL_PYTHONS", "").split()
pytestmark = pytest.mark.skipif(not WHEELS, reason="set FASTVISION_WHEELS to the folder of the built wheels "
                                                   "(tools/build_wheels.py --cpu --out DIR)")

SMOKE = r"""
import importlib.metadata, sys, torch
import fastvision, fastvision.ops
from fastvision.ops import criss_cross_attention
from fastvision.reference.criss_cross import criss_cross_attention_ref
assert fastvision.__file__.startswith(sys.prefix), fastvision.__file__   # the installed wheel, not the checkout
q, k, v = torch.randn(2, 4, 5, 6), torch.randn(2, 4, 5, 6), torch.randn(2, 8, 5, 6)
torch.testing.assert_close(criss_cross_attention(q, k, v, backend="cpu"), criss_cross_attention_ref(q, k, v))
print("ok", sys.version.split()[0], torch.__version__, importlib.metadata.version("fastvision"))
"""


def _run(cmd, **kw):
    result = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result.stdout


def _venv(path: Path, interpreter: str, packages: list[str]) -> Path:
    """`path`'s python (made with `interpreter` and `packages` unless it exists),
    with the CPU wheel installed (replacing any earlier one; --no-deps: torch stays)."""
    (wheel,) = sorted(Path(WHEELS).glob("fastvision-*+cpu-*.whl"))[-1:]
    python = path / "bin" / "python"
    if not python.exists():
        _run([interpreter, "-m", "venv", str(path)])
        _run([str(python), "-m", "pip", "install", "--quiet", *packages])
    _run([str(python), "-m", "pip", "install", "--quiet", "--force-reinstall", "--no-deps", str(wheel)])
    return python


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    path = Path(os.environ.get("FASTVISION_WHEEL_VENV") or tmp_path_factory.mktemp("wheel") / "venv")
    return _venv(path, sys.executable, [*TORCH, "numpy", "timm", "pytest", "hypothesis"])


def test_cpu_wheel_runs_with_another_torch(venv, tmp_path):
    out = _run([str(venv), "-c", SMOKE], cwd=tmp_path)
    assert out.startswith("ok "), out
    build_torch = _run([sys.executable, "-c", "import torch; print(torch.__version__)"]).strip()
    venv_torch = out.split()[2]
    assert venv_torch != build_torch, f"the venv's torch ({venv_torch}) should differ from the build's"
    assert out.split()[3].endswith("+cpu")
    info = _run([str(venv.parent / "fastvision"), "info"], cwd=tmp_path)
    assert "_C          loaded" in info, info


def test_torchvision_tests_pass_with_the_wheel(venv, tmp_path):
    """Every test marked ``torchvision`` (timm registration, torchvision parity: the
    files that use the mark), run from outside the checkout so that the installed
    wheel is what they import."""
    files = [str(p) for p in sorted((ROOT / "tests").glob("test_*.py")) if "mark.torchvision" in p.read_text()]
    assert files, "no test is marked torchvision"
    result = subprocess.run([str(venv), "-m", "pytest", "-q", "-m", "torchvision", "-p", "no:cacheprovider",
                             "--rootdir", str(ROOT), "-c", str(ROOT / "pyproject.toml"), *files],
                            capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    tail = result.stdout[-6000:] + result.stderr[-3000:]
    assert result.returncode == 0, tail
    assert " passed" in tail and " skipped" not in tail.split("\n")[-2], tail


@pytest.mark.parametrize("interpreter", PYTHONS)
def test_cpu_wheel_runs_on_other_pythons(interpreter, tmp_path_factory, tmp_path):
    version = _run([interpreter, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"]).strip()
    base = os.environ.get("FASTVISION_WHEEL_VENV")
    path = Path(f"{base}-py{version}") if base else tmp_path_factory.mktemp("wheel") / f"py{version}"
    python = _venv(path, interpreter, [TORCH[0], "numpy"])
    out = _run([str(python), "-c", SMOKE], cwd=tmp_path)
    assert out.startswith(f"ok {version}."), out


def test_cuda_wheel_loads_its_cuda_kernels_under_a_cuda_torch(venv, tmp_path):
    """A +cuXY wheel of the venv torch's CUDA major: _C_cuda loads (no GPU needed),
    although it was built against another torch (here a CPU one). Runs when such a
    wheel is in FASTVISION_WHEELS (tools/build_wheels.py --cuda 13); the CPU wheel is
    put back afterwards."""
    major = _run([str(venv), "-c", "import torch; print((torch.version.cuda or '0').split('.')[0])"]).strip()
    wheels = sorted(Path(WHEELS).glob(f"fastvision-*+cu{major}*-*.whl"))
    if not wheels:
        pytest.skip(f"no +cu{major}* wheel in {WHEELS}")
    try:
        _run([str(venv), "-m", "pip", "install", "--quiet", "--force-reinstall", "--no-deps", str(wheels[-1])])
        info = _run([str(venv.parent / "fastvision"), "info"], cwd=tmp_path)
        assert "_C_cuda     CUDA C++ kernels: loaded" in info, info
        assert f"fastvision  {wheels[-1].name.split('-')[1]}" in info
    finally:
        _venv(venv.parent.parent, sys.executable, [])
