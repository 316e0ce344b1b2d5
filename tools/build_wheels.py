#!/usr/bin/env python
"""Builds fastvision's wheels on a machine without a GPU, checks them, and writes
a find-links index page:

    python tools/build_wheels.py [--cuda 12 13] [--cpu] --out DIR

* ``--cpu``: the CPU wheel (``fastvision-X+cpu``): op schemas and CPU kernels; the
  Triton GPU kernels are Python and ship in every wheel.
* ``--cuda 13`` (and/or 12): a wheel with the CUDA C++ kernels too, built by an
  nvcc of that major (``+cu130``, ``+cu129``: the nvcc's version), for every GPU
  architecture that nvcc knows from Turing (sm_75) to Blackwell (sm_120), plus
  PTX for the newest so that later GPUs JIT it. The nvcc is found as
  ``$CUDA<major>_HOME/bin/nvcc`` (or ``$FASTVISION_NVCC_<major>``), else
  ``/usr/local/cuda-<major>*/bin/nvcc``, else an nvcc of that major on PATH;
  failing those, the NVIDIA packages of the package registry are installed into
  ``<out>/.buildenv/cu<major>`` and used if they carry a complete nvcc (see
  ``_registry_nvcc`` for what they carry today).

Every wheel is built against the torch in this environment (``--no-build-isolation``)
with the LibTorch stable ABI (torch >= 2.11) and CPython's limited API (abi3,
CPython >= 3.10), so one wheel per CUDA major serves every such torch and Python.
Checks, per wheel (the run fails if one fails): no libtorch/libc10/libcudart
shared library inside; the extension modules are ``*.abi3.so`` and need no
``libcudart.so`` (cudart is linked statically: its API is defined inside);
the wheel's tag is ``cp310-abi3-<platform>``; for CUDA wheels, the embedded SASS
and PTX architectures are the ones asked for. Sizes and the newest glibc /
libstdc++ symbol versions the modules need are reported.

Nothing is downloaded but the NVIDIA build packages for a missing nvcc. Build
directories are ``build/wheel-<variant>`` (the editable build's is untouched).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import html
import os
import re
import shutil
import struct
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The oldest GPU generation served (Turing) and the architectures built: one SASS
# per generation step that matters for speed (sm_80 SASS also runs on sm_86/87/89,
# but those get their own tuned code); PTX of the newest for GPUs after it.
MIN_ARCH = 75
FORBIDDEN_LIBS = re.compile(r"(^|/)lib(torch[^/]*|c10[^/]*|cudart)\.so")


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    print("+", " ".join(map(str, cmd)), flush=True)
    return subprocess.run(cmd, check=True, **kw)


# --------------------------------------------------------------------------
# nvcc


def nvcc_version(nvcc: str | Path) -> tuple[int, int]:
    out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, check=True).stdout
    major, minor = re.search(r"release (\d+)\.(\d+)", out).groups()
    return int(major), int(minor)


def _registry_nvcc(major: int, buildenv: Path) -> Path:
    """An nvcc of `major` from the package registry's NVIDIA wheels, or a clear error.

    Checked on 2026-11-29: ``nvidia-cuda-nvcc-cu12`` (12.9.86, and 12.4.131 before it)
    carries only ``bin/ptxas``, ``nvvm/lib64/libnvvm.so``, libdevice and the ``crt``
    headers: no ``nvcc`` driver, ``cicc`` front end, ``cudafe++``, ``fatbinary`` or
    ``nvlink``, so it cannot compile a .cu file; ``nvidia-cuda-runtime-cu12`` brings
    ``libcudart_static.a`` and the runtime headers, ``nvidia-cuda-cccl-cu12`` CCCL.
    """
    suffix = f"-cu{major}" if major == 12 else ""
    packages = [f"nvidia-cuda-nvcc{suffix}", f"nvidia-cuda-runtime{suffix}", f"nvidia-cuda-cccl{suffix}"]
    target = buildenv / f"cu{major}"
    if not target.exists():
        run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), *packages])
    found = sorted(target.glob("nvidia/cu*/bin/nvcc")) + sorted(target.glob("nvidia/cuda_nvcc/bin/nvcc"))
    if found:
        return found[0]
    have = sorted(str(p.relative_to(target)) for p in target.glob("nvidia/*/bin/*"))
    raise SystemExit(
        f"build_wheels: no nvcc {major}.x here. The registry's {', '.join(packages)} installed into "
        f"{target} carry {have or 'no programs'} but no nvcc driver (nor cicc, cudafe++, fatbinary, "
        f"nvlink): they cannot compile CUDA C++. Install a CUDA {major} toolkit and point "
        f"CUDA{major}_HOME at it.")


def find_nvcc(major: int, buildenv: Path) -> Path:
    candidates = [os.environ.get(f"FASTVISION_NVCC_{major}")]
    if os.environ.get(f"CUDA{major}_HOME"):
        candidates.append(str(Path(os.environ[f"CUDA{major}_HOME"]) / "bin" / "nvcc"))
    candidates += sorted(map(str, Path("/usr/local").glob(f"cuda-{major}*/bin/nvcc")), reverse=True)
    candidates += [shutil.which("nvcc")]
    for c in candidates:
        if c and Path(c).exists() and nvcc_version(c)[0] == major:
            return Path(c)
    return _registry_nvcc(major, buildenv)


def cuda_architectures(nvcc: Path) -> tuple[list[int], int]:
    """(SASS architectures, PTX architecture): what `nvcc` can build from MIN_ARCH on,
    without the embedded/automotive parts (sm_87, sm_88, sm_110: Jetson, Thor) and the
    minor revisions whose major's SASS already runs on them (sm_103 on sm_100's,
    sm_121 on sm_120's)."""
    listed = subprocess.run([str(nvcc), "--list-gpu-code"], capture_output=True, text=True,
                            check=True).stdout.split()
    archs = sorted({int(a[3:]) for a in listed if re.fullmatch(r"sm_\d+", a)})
    archs = [a for a in archs if a >= MIN_ARCH and a not in (87, 88, 110)
             and not (a >= 100 and a % 10 and a - a % 10 in archs)]
    return archs, archs[-1]


# --------------------------------------------------------------------------
# build


def build(variant: str, out: Path, env_extra: dict[str, str], cmake_defines: dict[str, str],
          build_dir: str | None = None) -> Path:
    """`pip wheel` of the checkout into `out` (built against this environment's torch),
    then the local version `+<variant>` put into its name and metadata."""
    env = {**os.environ, **env_extra}
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-w", tmp,
               "-C", f"build-dir={build_dir or f'build/wheel-{variant}'}", str(ROOT)]
        for k, v in cmake_defines.items():
            cmd[-1:-1] = ["-C", f"cmake.define.{k}={v}"]
        run(cmd, env=env, cwd=ROOT)
        (wheel,) = Path(tmp).glob("*.whl")
        return set_local_version(wheel, variant, out)


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def set_local_version(wheel: Path, local: str, out: Path) -> Path:
    """A copy of `wheel` in `out` whose version is `<version>+<local>` (file name,
    .dist-info folder, METADATA, RECORD), as torch's `+cpu` / `+cu130` wheels."""
    name, version, rest = wheel.name.split("-", 2)
    new_version = f"{version.split('+')[0]}+{local}"
    old_info, new_info = f"{name}-{version}.dist-info/", f"{name}-{new_version}.dist-info/"
    target = out / f"{name}-{new_version}-{rest}"
    records = []
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            arcname = item.filename.replace(old_info, new_info, 1)
            if arcname == new_info + "RECORD":
                continue
            data = src.read(item)
            if arcname == new_info + "METADATA":
                data = re.sub(rb"(?m)^Version: .*$", f"Version: {new_version}".encode(), data, count=1)
            info = zipfile.ZipInfo(arcname, item.date_time)
            info.external_attr, info.compress_type = item.external_attr, zipfile.ZIP_DEFLATED
            dst.writestr(info, data)
            records.append(_record_line(arcname, data))
        records.append(f"{new_info}RECORD,,")
        dst.writestr(new_info + "RECORD", "\n".join(records) + "\n")
    return target


# --------------------------------------------------------------------------
# checks


def _undefined(so: Path) -> set[str]:
    out = subprocess.run(["nm", "-D", "-u", str(so)], capture_output=True, text=True, check=True).stdout
    return {line.split()[-1] for line in out.splitlines() if line.strip()}


def _needed(so: Path) -> list[str]:
    out = subprocess.run(["readelf", "-d", str(so)], capture_output=True, text=True, check=True).stdout
    return re.findall(r"\(NEEDED\).*\[(.+)\]", out)


def _max_version(so: Path, prefix: str) -> str | None:
    out = subprocess.run(["objdump", "-T", str(so)], capture_output=True, text=True).stdout
    found = {tuple(map(int, v.split("."))) for v in re.findall(rf"\b{prefix}_([\d.]+)\b", out)}
    return ".".join(map(str, max(found))) if found else None


def embedded_archs(so: Path) -> tuple[set[int], set[int]]:
    """(SASS, PTX) architectures of the CUDA fat binaries in `so`, read from their
    headers (no cuobjdump needed): a fat binary starts with magic 0xBA55ED50, a u16
    version, a u16 header size and a u64 size; each entry then has a u16 kind (1 PTX,
    2 ELF), a u32 header size at offset 4, a u64 padded payload size at offset 8 and
    the u32 architecture (e.g. 90) at offset 28."""
    data = so.read_bytes()
    sass, ptx = set(), set()
    start = data.find(b"\x50\xed\x55\xba")
    while start >= 0:
        _, _, header, size = struct.unpack_from("<IHHQ", data, start)
        entry, end = start + header, start + header + size
        while entry < end:
            kind, _, entry_header, padded = struct.unpack_from("<HHIQ", data, entry)
            (arch,) = struct.unpack_from("<I", data, entry + 28)
            (ptx if kind == 1 else sass).add(arch)
            entry += entry_header + padded
        start = data.find(b"\x50\xed\x55\xba", max(end, start + 1))
    return sass, ptx


def check_wheel(wheel: Path, cuda: tuple[list[int], int] | None) -> list[str]:
    """What is wrong with `wheel` (empty: nothing); prints a report."""
    problems = []
    m = re.fullmatch(r"fastvision-[^-]+-(cp\d+)-(abi3)-([^-]+)\.whl", wheel.name)
    if not m or m.group(1) != "cp310":
        problems.append(f"tag is not cp310-abi3-<platform>: {wheel.name}")
    with zipfile.ZipFile(wheel) as z, tempfile.TemporaryDirectory() as tmp:
        names = z.namelist()
        wheel_meta = z.read(next(n for n in names if n.endswith(".dist-info/WHEEL"))).decode()
        if "Tag: cp310-abi3-" not in wheel_meta:
            problems.append("WHEEL metadata has no cp310-abi3 tag")
        bad = [n for n in names if FORBIDDEN_LIBS.search(n)]
        if bad:
            problems.append(f"bundles torch/CUDA runtime libraries: {bad}")
        modules = [n for n in names if n.endswith(".so")]
        expected = {"fastvision/_C.abi3.so"} | ({"fastvision/_C_cuda.abi3.so"} if "+cu" in wheel.name else set())
        if set(modules) != expected:
            problems.append(f"extension modules {sorted(modules)}, expected {sorted(expected)}")
        print(f"{wheel.name}: {wheel.stat().st_size / 2**20:.1f} MiB, {len(names)} files")
        for n in modules:
            so = Path(z.extract(n, tmp))
            needed = _needed(so)
            if any(FORBIDDEN_LIBS.search("/" + lib) and "cudart" in lib for lib in needed):
                problems.append(f"{n} needs a shared cudart: {needed}")
            glibc, glibcxx = _max_version(so, "GLIBC"), _max_version(so, "GLIBCXX")
            print(f"  {n}: {so.stat().st_size / 2**20:.1f} MiB, needs {', '.join(needed)}; "
                  f"newest GLIBC_{glibc}, GLIBCXX_{glibcxx}")
            if n.endswith("_C_cuda.abi3.so"):
                if "cudaLaunchKernel" in _undefined(so):
                    problems.append(f"{n}: cudaLaunchKernel is undefined (cudart not static)")
                got_sass, got_ptx = embedded_archs(so)
                print(f"    SASS sm_{', sm_'.join(map(str, sorted(got_sass)))}; "
                      f"PTX compute_{', compute_'.join(map(str, sorted(got_ptx)))}")
                if not got_sass:
                    problems.append(f"{n}: no SASS found")
                if cuda and (got_sass != set(cuda[0]) or got_ptx != {cuda[1]}):
                    sass, ptx = cuda
                    problems.append(f"{n}: SASS {sorted(got_sass)} / PTX {sorted(got_ptx)}, "
                                    f"expected {sass} / [{ptx}]")
    for p in problems:
        print(f"  FAILED: {p}")
    return problems


# --------------------------------------------------------------------------
# index page


def write_index(out: Path) -> Path:
    """`out`/index.html: a link per wheel, for ``pip install fastvision -f <url of out>``
    (pip's find-links reads the links of an HTML page)."""
    wheels = sorted(out.glob("fastvision-*.whl"))
    rows = []
    for w in wheels:
        digest = hashlib.sha256(w.read_bytes()).hexdigest()
        rows.append(f'<a href="{html.escape(w.name)}#sha256={digest}">{html.escape(w.name)}</a><br>')
    page = ("<!DOCTYPE html>\n<html><head><title>fastvision wheels</title></head><body>\n"
            "<h1>fastvision wheels</h1>\n"
            "<p>pip install fastvision -f &lt;this page's URL&gt; (+cpu: CPU kernels; +cuXYZ: CUDA C++ "
            "kernels built by CUDA X.Y for sm_75 to sm_120; each serves every torch &gt;= 2.11 and "
            "CPython &gt;= 3.10)</p>\n" + "\n".join(rows) + "\n</body></html>\n")
    index = out / "index.html"
    index.write_text(page)
    return index


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="build the CPU wheel (+cpu)")
    parser.add_argument("--cuda", type=int, nargs="*", default=[], metavar="MAJOR",
                        help="build a CUDA wheel per CUDA major (12, 13)")
    parser.add_argument("--archs", type=int, nargs="*", metavar="SM",
                        help="SASS architectures instead of the nvcc's Turing..Blackwell list "
                             "(the last also gets PTX); for quick trial builds")
    parser.add_argument("--reuse-editable-build", action="store_true",
                        help="build the CPU wheel in the editable install's build directory "
                             "(build/cp310-abi3-<platform>), reusing its objects (CI)")
    parser.add_argument("--check-only", action="store_true", help="check the wheels already in --out")
    parser.add_argument("--out", type=Path, required=True, help="where the wheels and index.html go")
    args = parser.parse_args(argv)
    if not (args.cpu or args.cuda or args.check_only):
        parser.error("nothing to build: give --cpu and/or --cuda MAJOR ...")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    problems = []
    if args.check_only:
        for w in sorted(out.glob("fastvision-*.whl")):
            problems += check_wheel(w, None)  # CUDA wheels: the architectures are listed, not compared
    if args.cpu:
        editable = f"build/cp310-abi3-{sysconfig.get_platform().replace('-', '_').replace('.', '_')}"
        wheel = build("cpu", out, {"FASTVISION_CUDA": "0"}, {}, editable if args.reuse_editable_build else None)
        problems += check_wheel(wheel, None)
    for major in args.cuda:
        nvcc = find_nvcc(major, out / ".buildenv")
        version = nvcc_version(nvcc)
        sass, ptx = (args.archs, args.archs[-1]) if args.archs else cuda_architectures(nvcc)
        cudaarchs = ";".join([f"{a}-real" for a in sass] + [f"{ptx}-virtual"])
        print(f"CUDA {version[0]}.{version[1]} ({nvcc}): SASS {sass}, PTX {ptx}", flush=True)
        toolkit = str(nvcc.resolve().parent.parent)
        wheel = build(f"cu{version[0]}{version[1]}", out,
                      {"FASTVISION_CUDA": "1", "CUDAARCHS": cudaarchs, "CUDACXX": str(nvcc),
                       "CUDAToolkit_ROOT": toolkit, "PATH": f"{nvcc.parent}:{os.environ['PATH']}"},
                      {"CMAKE_CUDA_FLAGS": f"--threads={os.cpu_count() or 1}"})
        problems += check_wheel(wheel, (sass, ptx))
    index = write_index(out)
    print(f"index: {index}")
    if problems:
        print(f"build_wheels: {len(problems)} check(s) failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
