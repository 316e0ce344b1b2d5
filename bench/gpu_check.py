#!/usr/bin/env python3
"""GPU validation in stages, each fitting one 8-minute command on a GPU machine.

    bash bench/gpu_check.sh --stage smoke      # the FIRST command on a GPU machine
    bash bench/gpu_check.sh --stage build|smoke|tests|bench|all [options]

Stages (``all`` runs them in this order; each ends within ``--budget``
seconds, default 450, and is resumable: run it again to continue):

build   make fastvision importable with its CUDA C++ kernels (_C_cuda):
        libraries carried from another machine in ``--prebuilt`` (default
        .prebuilt/: _C.abi3.so and _C_cuda.abi3.so, copied into fastvision/),
        else a build from source for the device's own architecture
        (FASTVISION_CUDA=1 CUDAARCHS=<cc> pip install --no-build-isolation
        --no-deps --no-index -e .). Skipped when the CUDA kernels already load.
        The later stages run it first when the kernels do not load.
smoke   compiles the smoke test's Triton kernels for the device in parallel
        (bench/compile_check.py --warm), then runs tests/test_gpu_smoke.py:
        every kernel once per dtype, forward and backward, against the
        float32 reference. Skipped when recorded as passed for the same sources.
tests   the `gpu`-marked tests (all but the smoke file), kernels compiled
        first, one pytest run per file (with pytest-xdist when installed);
        files recorded as passed for the same sources are skipped.
bench   `fastvision bench --device cuda --dtype D --json` for float32,
        float16, bfloat16; a dtype whose JSON is present is skipped.

Results go to ``--results`` (default bench/results/gpu/): <stage>.json (what
resumption reads), <stage>.txt (summary and the end of the log), logs,
JUnit XML, bench-<dtype>.json, and one line per stage run appended to
summary.txt: stage, status, counts, wall time, device, versions, sources.
``--archive FILE`` writes the results folder as a .tar.gz after the stage
(e.g. into a folder that comes back from the GPU machine).

Without a GPU every stage fails at once with exit status 2 and says so;
``--dry-run`` prints each stage's plan (what would run, what is recorded and
skipped) without a GPU and without running or writing anything.

Exit status: 0 passed (or skipped: already recorded), 1 failed, 2 no GPU or
bad arguments, 3 incomplete (the budget ran out: run the stage again).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("build", "smoke", "tests", "bench")
BENCH_DTYPES = ("float32", "float16", "bfloat16")
SMOKE_FILE = "tests/test_gpu_smoke.py"
PASS, FAIL, INCOMPLETE, SKIP = "pass", "fail", "incomplete", "skipped"
EXIT = {PASS: 0, SKIP: 0, FAIL: 1, INCOMPLETE: 3}
# A benchmark dtype is not started with less time left than this (seconds).
BENCH_MIN_S = 120


class NoGPU(Exception):
    pass


# --------------------------------------------------------------------------
# Facts


def source_hash(parts=("fastvision", "csrc", "tests", "bench/compile_check.py", "CMakeLists.txt",
                       "pyproject.toml")) -> str:
    """A hash of the sources a GPU result depends on (no git needed: the GPU
    machine gets a copy of the working tree)."""
    h = hashlib.sha256()
    for part in parts:
        p = ROOT / part
        files = sorted(p.rglob("*")) if p.is_dir() else [p]
        for f in files:
            if f.is_file() and f.suffix in (".py", ".cpp", ".cu", ".h", ".txt", ".toml") \
                    and "__pycache__" not in f.parts:
                h.update(str(f.relative_to(ROOT)).encode())
                h.update(f.read_bytes())
    return h.hexdigest()[:12]


def build_hash() -> str:
    return source_hash(("csrc", "CMakeLists.txt", "pyproject.toml"))


def _version(dist: str):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def probe(dry_run: bool) -> dict:
    """Device and versions; raises NoGPU without a CUDA device (unless dry_run)."""
    import torch
    info = dict(torch=torch.__version__, cuda=torch.version.cuda, triton=_version("triton"),
                python=platform.python_version(), host=platform.node(), gpus=0, device="none", cc=None)
    nvcc = shutil.which("nvcc")
    if nvcc:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
        m = re.search(r"release ([\d.]+)", out)
        info["nvcc"] = m.group(1) if m else "?"
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        info.update(gpus=torch.cuda.device_count(), device=torch.cuda.get_device_name(0), cc=f"{major}{minor}")
    elif not dry_run:
        raise NoGPU(f"torch {torch.__version__} sees no CUDA GPU (torch's CUDA: "
                    f"{torch.version.cuda or 'none, a CPU-only build'}; "
                    f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    return info


# --------------------------------------------------------------------------
# Running and recording


class Stage:
    """One stage's run: a budget, a log, and its record."""

    def __init__(self, name: str, args, info: dict):
        self.name, self.args, self.info = name, args, info
        self.results: Path = args.results
        self.t0 = time.monotonic()
        self.log_lines: list[str] = []
        self.dry = args.dry_run

    def remaining(self) -> float:
        return self.args.budget - (time.monotonic() - self.t0)

    def say(self, text: str) -> None:
        print(f"[{self.name}] {text}", flush=True)
        self.log_lines.append(text)

    def run(self, cmd: list[str], log: str | None = None, env: dict | None = None,
            timeout: float | None = None) -> int | None:
        """Runs cmd from the repository root, output to the console and `log`;
        None if it ran out of time (killed)."""
        shown = " ".join(cmd)
        if self.dry:
            self.say(f"would run: {shown}")
            return 0
        self.say(f"run: {shown}")
        timeout = self.remaining() if timeout is None else min(timeout, self.remaining())
        if timeout <= 5:
            self.say("no time left in the budget for it")
            return None
        full_env = {**os.environ, **(env or {})}
        log_f = open(self.results / log, "w") if log else None
        try:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, start_new_session=True)
            deadline = time.monotonic() + timeout
            tail: list[str] = []
            import selectors
            sel = selectors.DefaultSelector()
            sel.register(proc.stdout, selectors.EVENT_READ)
            killed = False
            while True:
                if time.monotonic() > deadline:
                    os.killpg(proc.pid, 9)
                    killed = True
                    break
                if sel.select(timeout=1.0):
                    line = proc.stdout.readline()
                    if not line:
                        break
                    sys.stdout.write(line)
                    if log_f:
                        log_f.write(line)
                    tail = (tail + [line.rstrip("\n")])[-40:]
            proc.wait()
            self.tail = tail
            if killed:
                self.say(f"stopped after {timeout:.0f} s (the stage's budget)")
                return None
            return proc.returncode
        finally:
            if log_f:
                log_f.close()

    # ---- records

    def load(self, stage: str | None = None) -> dict:
        path = self.results / f"{stage or self.name}.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return {}

    def finish(self, status: str, counts: dict | None = None, details: dict | None = None) -> str:
        wall = time.monotonic() - self.t0
        counts = counts or {}
        if self.dry:
            self.say(f"dry run: would end as recorded above (nothing written); {wall:.1f} s")
            return status
        i = self.info
        record = dict(stage=self.name, status=status, counts=counts, wall_s=round(wall, 1),
                      date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                      device=i["device"], cc=i["cc"], gpus=i["gpus"],
                      versions={k: i.get(k) for k in ("torch", "cuda", "triton", "nvcc", "python")},
                      src=source_hash(), **(details or {}))
        self.results.mkdir(parents=True, exist_ok=True)
        (self.results / f"{self.name}.json").write_text(json.dumps(record, indent=1) + "\n")
        line = (f"{record['date']} stage={self.name} status={status} "
                + " ".join(f"{k}={v}" for k, v in counts.items())
                + f" wall={wall:.0f}s device=\"{i['device']}\" cc={i['cc']} torch={i['torch']} "
                  f"cuda={i['cuda']} triton={i['triton']} nvcc={i.get('nvcc')} python={i['python']} "
                  f"src={record['src']}")
        (self.results / f"{self.name}.txt").write_text(
            line + "\n\n" + "\n".join(self.log_lines) + "\n\nend of the last command's output:\n"
            + "\n".join(getattr(self, "tail", [])) + "\n")
        with open(self.results / "summary.txt", "a") as f:
            f.write(line + "\n")
        print(line, flush=True)
        return status


def junit_counts(path: Path) -> dict:
    """passed/failed/errors/skipped from a JUnit XML file (pytest's)."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return {}
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    return dict(passed=n["tests"] - n["failures"] - n["errors"] - n["skipped"], failed=n["failures"],
                errors=n["errors"], skipped=n["skipped"])


def _py() -> str:
    return sys.executable


def _xdist(jobs: int) -> list[str]:
    return ["-n", str(jobs)] if importlib.util.find_spec("xdist") is not None and jobs > 1 else []


def warm(st: Stage, source: str, extra: list[str] = ()) -> None:
    """Compile the source's Triton kernels for the device in parallel (failures
    show up again, with context, in the run that follows)."""
    rc = st.run([_py(), "bench/compile_check.py", "--warm", "--source", source, "--jobs", str(st.args.jobs),
                 "--json", str(st.results / f"warm-{source}.json"), *extra], log=f"warm-{source}.log",
                timeout=st.remaining() * 0.6)
    if rc not in (0, None):
        st.say(f"warm-up of the {source} kernels reported failures (exit {rc}); see warm-{source}.log")


# --------------------------------------------------------------------------
# Stages


def cuda_state() -> dict:
    """Whether fastvision imports here with its CUDA C++ kernels (in a child process)."""
    code = ("import json, fastvision, fastvision._extension as e; "
            "print(json.dumps(dict(loaded=e.CUDA_LOADED, built=e.CUDA_BUILT, error=e.CUDA_ERROR)))")
    r = subprocess.run([_py(), "-c", code], cwd=ROOT, capture_output=True, text=True)
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return dict(loaded=False, built=None, error=(r.stderr.strip().splitlines() or ["import failed"])[-1])


def stage_build(st: Stage) -> str:
    prebuilt = Path(st.args.prebuilt)
    libs = sorted(prebuilt.glob("_C*.so")) if prebuilt.is_dir() else []
    state = cuda_state() if not st.dry else dict(loaded=False)
    if state.get("loaded") and not st.args.force:
        st.say("fastvision's CUDA C++ kernels already load here: nothing to build (--force rebuilds)")
        return st.finish(SKIP, dict(mode="present"))
    mode = None
    if libs:
        st.say(f"carried libraries in {prebuilt}: {', '.join(l.name for l in libs)} -> fastvision/")
        mode = "carried"
        if not st.dry:
            for lib in libs:
                shutil.copy2(lib, ROOT / "fastvision" / lib.name)
            state = cuda_state()
            if not state.get("loaded"):
                st.say(f"the carried libraries do not load here ({state.get('error')}): removed; "
                       "building from source instead")
                for lib in libs:
                    (ROOT / "fastvision" / lib.name).unlink(missing_ok=True)
                mode = None
    if mode is None:
        cc = st.info["cc"] or "<device cc>"
        if not libs:
            st.say(f"no carried libraries in {prebuilt}: building from source for sm_{cc}")
        rc = st.run([_py(), "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "-v",
                     "-e", "."], log="build.log", env={"FASTVISION_CUDA": "1", "CUDAARCHS": str(cc)})
        if rc is None:
            return st.finish(INCOMPLETE, dict(mode="source"))
        if rc != 0:
            st.say("the build failed: see build.log")
            return st.finish(FAIL, dict(mode="source"))
        mode = "source"
    if st.dry:
        return st.finish(PASS, dict(mode=mode))
    state = cuda_state()
    st.run([_py(), "-m", "fastvision", "info"], log="info.txt", timeout=60)
    if not state.get("loaded"):
        st.say(f"fastvision's CUDA C++ kernels do not load: {state.get('error')}")
        return st.finish(FAIL, dict(mode=mode), dict(build_hash=build_hash(), error=state.get("error")))
    return st.finish(PASS, dict(mode=mode), dict(build_hash=build_hash()))


def ensure_built(st: Stage) -> bool:
    if st.dry:
        st.say("would check that fastvision's CUDA C++ kernels load, and run the build stage if not")
        return True
    state = cuda_state()
    if state.get("loaded"):
        return True
    st.say(f"the CUDA C++ kernels do not load ({state.get('error') or 'not built'}): running the build stage first")
    sub = Stage("build", st.args, st.info)
    sub.t0 = st.t0
    return stage_build(sub) in (PASS, SKIP)


def stage_smoke(st: Stage) -> str:
    src = source_hash()
    rec = st.load()
    if rec.get("status") == PASS and rec.get("src") == src and not st.args.force:
        st.say(f"recorded as passed for these sources ({src}, {rec.get('date')}): skipped (--force reruns)")
        return SKIP
    if not ensure_built(st):
        return st.finish(FAIL, {}, dict(error="build failed"))
    warm(st, "smoke")
    xml = st.results / "smoke.xml"
    rc = st.run([_py(), "-m", "pytest", "-m", "gpu", SMOKE_FILE, "-q", "-rfE", "-p", "no:cacheprovider",
                 f"--junitxml={xml}"], log="smoke.log")
    if st.dry:
        return st.finish(PASS)
    counts = junit_counts(xml)
    if rc is None:
        return st.finish(INCOMPLETE, counts)
    ok = rc == 0 and counts.get("passed", 0) > 0 and not counts.get("failed") and not counts.get("errors")
    return st.finish(PASS if ok else FAIL, counts)


def gpu_test_files(st: Stage) -> list[str]:
    """Test files with `gpu`-marked tests, the smoke file aside (pytest's own collection)."""
    if st.dry:
        files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                       if "mark.gpu" in p.read_text())
    else:
        r = subprocess.run([_py(), "-m", "pytest", "-m", "gpu", "--collect-only", "-q", "-p", "no:cacheprovider",
                            "tests/"], cwd=ROOT, capture_output=True, text=True)
        files = sorted({line.split("::")[0] for line in r.stdout.splitlines() if "::" in line})
    return [f for f in files if f != SMOKE_FILE]


def stage_tests(st: Stage) -> str:
    src = source_hash()
    rec = st.load()
    done = rec.get("files", {}) if rec.get("src") == src and not st.args.force else {}
    files = gpu_test_files(st)
    todo = [f for f in files if done.get(f, {}).get("status") != PASS]
    for f in files:
        if f not in todo:
            st.say(f"{f}: recorded as passed for these sources: skipped")
    if not todo:
        st.say("every gpu test file is recorded as passed for these sources (--force reruns)")
        return SKIP
    if not ensure_built(st):
        return st.finish(FAIL, {}, dict(error="build failed"))
    warm(st, "tests")
    status = PASS
    for f in todo:
        stem = Path(f).stem
        xml = st.results / f"tests-{stem}.xml"
        rc = st.run([_py(), "-m", "pytest", "-m", "gpu", f, "-q", "-rfEs", "-p", "no:cacheprovider",
                     *_xdist(min(st.args.jobs, 8)), f"--junitxml={xml}"], log=f"tests-{stem}.log")
        if st.dry:
            continue
        counts = junit_counts(xml) if rc is not None else {}
        if rc is None:
            done[f] = dict(status=INCOMPLETE)
            status = INCOMPLETE
            break
        ok = rc in (0, 5) and not counts.get("failed") and not counts.get("errors")  # 5: all deselected
        done[f] = dict(status=PASS if ok else FAIL, **counts)
        if not ok:
            status = FAIL
    if st.dry:
        return st.finish(PASS)
    totals = {k: sum(v.get(k, 0) for v in done.values()) for k in ("passed", "failed", "errors", "skipped")}
    left = [f for f in files if done.get(f, {}).get("status") != PASS]
    if status == PASS and left:
        status = FAIL
    totals["files"] = f"{len(files) - len(left)}/{len(files)}"
    return st.finish(status, totals, dict(files=done))


def stage_bench(st: Stage) -> str:
    plot = importlib.util.find_spec("matplotlib") is not None
    status, recorded = PASS, []
    todo = []
    for dtype in st.args.dtypes:
        path = st.results / f"bench-{dtype}.json"
        try:
            records = json.loads(path.read_text())
        except (OSError, ValueError):
            records = None
        if records and not st.args.force:
            st.say(f"{dtype}: {path.name} present ({len(records)} records): skipped (--force reruns)")
            recorded.append(dtype)
        else:
            todo.append(dtype)
    if not todo:
        return SKIP
    if not ensure_built(st):
        return st.finish(FAIL, {}, dict(error="build failed"))
    errors = 0
    for dtype in todo:
        if not st.dry and st.remaining() < BENCH_MIN_S:
            st.say(f"{dtype}: less than {BENCH_MIN_S} s left in the budget: not started (run the stage again)")
            status = INCOMPLETE
            break
        warm(st, "bench", ["--dtypes", dtype])
        final = st.results / f"bench-{dtype}.json"
        partial = st.results / f"bench-{dtype}.json.partial"
        cmd = [_py(), "-m", "fastvision", "bench", "--device", "cuda", "--dtype", dtype, "--budget",
               str(st.args.bench_budget), "--json", str(partial)]
        if plot:
            cmd += ["--plot", str(st.results / f"bench-{dtype}.png")]
        rc = st.run(cmd, log=f"bench-{dtype}.txt")
        if st.dry:
            continue
        if rc is None:
            status = INCOMPLETE
            break
        try:
            records = json.loads(partial.read_text())
        except (OSError, ValueError):
            records = None
        if not records or rc not in (0, 1):  # 1: some implementation failed; its record says why
            st.say(f"{dtype}: the benchmark failed (exit {rc}); see bench-{dtype}.txt")
            status = FAIL
            continue
        partial.replace(final)
        errors += sum(1 for r in records if "error" in r)
        recorded.append(dtype)
        if rc == 1:
            st.say(f"{dtype}: recorded; some implementations failed (see 'error' in {final.name})")
    if st.dry:
        return st.finish(PASS)
    if status == PASS and errors:
        status = FAIL
    return st.finish(status, dict(dtypes=f"{len(recorded)}/{len(st.args.dtypes)}", impl_errors=errors))


RUN = {"build": stage_build, "smoke": stage_smoke, "tests": stage_tests, "bench": stage_bench}


# --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpu_check.sh", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--stage", required=True, choices=(*STAGES, "all"))
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "gpu",
                   help="results folder (default bench/results/gpu)")
    p.add_argument("--dry-run", "--no-gpu", dest="dry_run", action="store_true",
                   help="print the plan (what would run or be skipped); needs no GPU, runs and writes nothing")
    p.add_argument("--force", action="store_true", help="redo work that is recorded as done")
    p.add_argument("--budget", type=float, default=450.0,
                   help="seconds per stage: no work is started past it (default 450, inside 8 minutes)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile/test processes")
    p.add_argument("--prebuilt", default=str(ROOT / ".prebuilt"),
                   help="folder of carried _C.abi3.so/_C_cuda.abi3.so (default .prebuilt)")
    p.add_argument("--dtypes", nargs="+", choices=BENCH_DTYPES, default=list(BENCH_DTYPES),
                   help="bench stage: the dtypes (default all three)")
    p.add_argument("--bench-budget", type=float, default=0.5,
                   help="bench stage: fastvision bench --budget (seconds per measurement)")
    p.add_argument("--archive", metavar="FILE.tar.gz", help="after the stage, archive the results folder")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.results = args.results.resolve()
    try:
        info = probe(args.dry_run)
    except NoGPU as err:
        print(f"gpu_check: NO GPU: {err}.\n"
              f"gpu_check: stage '{args.stage}' needs a machine with a CUDA GPU; nothing was run or "
              "recorded. `--dry-run` shows the plan without one.", file=sys.stderr)
        return 2
    if not args.dry_run:
        args.results.mkdir(parents=True, exist_ok=True)
    print(f"gpu_check: {info['device']} (cc {info['cc']}, {info['gpus']} GPU(s)), torch {info['torch']} "
          f"(CUDA {info['cuda']}), triton {info['triton']}, nvcc {info.get('nvcc')}, python {info['python']}; "
          f"results in {args.results}" + (" [dry run]" if args.dry_run else ""), flush=True)
    stages = STAGES if args.stage == "all" else (args.stage,)
    codes = []
    for name in stages:
        status = RUN[name](Stage(name, args, info))
        codes.append(EXIT[status])
        if name == "build" and codes[-1]:
            break
    if args.archive and not args.dry_run:
        with tarfile.open(args.archive, "w:gz") as tar:
            tar.add(args.results, arcname=args.results.name)
        print(f"gpu_check: results archived in {args.archive}")
    return 1 if 1 in codes else max(codes)


if __name__ == "__main__":
    sys.exit(main())
