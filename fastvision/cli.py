"""The ``fastvision`` command: ``fastvision info`` and ``fastvision bench``."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys

# Kineto prints a line on every profiler start/stop (the CPU memory
# measurement) unless told otherwise before torch loads it.
os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # 6: above USDT (5), its highest level

import torch  # noqa: E402

import fastvision  # noqa: E402


# --------------------------------------------------------------------------
# fastvision info


def _triton_version() -> str | None:
    try:  # without importing triton: that would fix TRITON_INTERPRET for this process
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None


def _fastvision_version() -> str:
    """The installed distribution's version: a wheel's says which build it is
    (0.1.0+cpu, 0.1.0+cu130); a checkout without metadata gives the package's."""
    try:
        return importlib.metadata.version("fastvision")
    except importlib.metadata.PackageNotFoundError:
        return fastvision.__version__


def op_backends(cuda_available: bool) -> dict[str, dict[str, dict[str, str | None]]]:
    """fused op -> device -> backend -> None where it can run, else the op's reason
    (``FusedOp.why_not``; inputs aside). Only the backends that take tensors on that
    device are listed (the Triton interpreter on CPU is a test tool)."""
    from fastvision.ops._library import FUSED_OPS
    candidates = {"cpu": ("cpu", "triton", "reference"), "cuda": ("cuda", "triton", "reference")}
    result = {}
    for name, op in FUSED_OPS.items():
        result[name] = {}
        for device, backends in candidates.items():
            result[name][device] = {b: op.why_not(b, device) for b in backends}
    return result


def collect_info() -> dict:
    """What is installed and which backends run where; never raises for a broken build."""
    info = {
        "fastvision": _fastvision_version(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _triton_version(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cuda_available": torch.cuda.is_available(),
        "gpus": [],
    }
    try:
        from fastvision import _extension
        info.update(C_loaded=True, C_error=None, C_cuda_built=_extension.CUDA_BUILT,
                    C_cuda_loaded=_extension.CUDA_LOADED, C_cuda_error=_extension.CUDA_ERROR)
        importlib.import_module("fastvision.ops")  # defines the fused ops
        info["backends"] = op_backends(info["cuda_available"])
    except ImportError as err:  # _C missing or broken: say so instead of a traceback
        info.update(C_loaded=False, C_error=str(err), C_cuda_built=None, C_cuda_loaded=False,
                    C_cuda_error=None, backends={})
    from fastvision.bench.core import cpu_name  # torch only: imports without _C
    info["cpu"] = cpu_name()
    if info["cuda_available"]:
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            info["gpus"].append({"index": i, "name": torch.cuda.get_device_name(i),
                                 "compute_capability": f"{major}.{minor}"})
    return info


def _backend_lines(backends: dict, cuda_available: bool) -> list[str]:
    """A row per fused op (usable backends per device), then why the others are not
    usable: once for a reason every op shares, per op otherwise."""
    if not backends:
        return []
    interpreter = os.environ.get("TRITON_INTERPRET") == "1"
    cells = {}
    for op, per_device in backends.items():
        row = []
        for device in ("cpu", "cuda"):
            usable = [b + (" (interpreter)" if b == "triton" and device == "cpu" and interpreter else "")
                      for b, why in per_device[device].items() if why is None]
            row.append(", ".join(usable) or "none")
        if not cuda_available:
            row[1] += " *"
        cells[op] = row
    w_op = max(len("fused op"), *(len(op) for op in cells))
    w_cpu = max(len("on cpu"), *(len(r[0]) for r in cells.values()))
    lines = ["backends    usable per fused op and device",
             f"  {'fused op'.ljust(w_op)}  {'on cpu'.ljust(w_cpu)}  on cuda"]
    lines += [f"  {op.ljust(w_op)}  {row[0].ljust(w_cpu)}  {row[1]}" for op, row in cells.items()]
    if not cuda_available:
        lines.append("  * no CUDA device visible to torch: what would run on one")
    reasons: dict[tuple[str, str, str], list[str]] = {}
    for op, per_device in backends.items():
        for device, per_backend in per_device.items():
            for backend, why in per_backend.items():
                if why is not None:
                    reasons.setdefault((backend, device, why), []).append(op)
    for i, ((backend, device, why), ops) in enumerate(reasons.items()):
        which = "all ops" if len(ops) == len(backends) else ", ".join(ops)
        lines.append(f"  {'why not:' if i == 0 else '':8} {backend} on {device} ({which}): {why}")
    return lines


def _print_info(info: dict) -> None:
    cuda_build = f"CUDA {info['torch_cuda']}" if info["torch_cuda"] else "CPU-only build"
    lines = [
        f"fastvision  {info['fastvision']}",
        f"python      {info['python']}",
        f"torch       {info['torch']} ({cuda_build})",
        f"triton      {info['triton'] or 'not installed'}",
        "_C          " + ("loaded (op schemas + CPU kernels)" if info["C_loaded"]
                          else f"NOT loaded: {info['C_error']}"),
    ]
    if info["C_loaded"]:
        state = ("loaded" if info["C_cuda_loaded"] else
                 f"built, not loaded: {info['C_cuda_error']}" if info["C_cuda_error"] else
                 "built, not loaded (torch has no CUDA)" if info["C_cuda_built"] else
                 "not built (no nvcc at build time)")
        lines.append(f"_C_cuda     CUDA C++ kernels: {state}")
    lines.append(f"CPU         {info['cpu']}, torch uses {info['threads']} threads "
                 f"({info['cpu_count']} logical CPUs)")
    for gpu in info["gpus"] or [None]:
        lines.append("GPU         " + ("none visible to torch" if gpu is None else
                                       f"[{gpu['index']}] {gpu['name']} (compute capability "
                                       f"{gpu['compute_capability']})"))
    lines += _backend_lines(info["backends"], info["cuda_available"])
    print("\n".join(lines))


def cmd_info(args) -> int:
    info = collect_info()
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        _print_info(info)
    return 0


# --------------------------------------------------------------------------
# fastvision bench


def cmd_bench(args) -> int:
    from fastvision import bench
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        ops = bench.validate(args.ops, device, args.dtype)
    except ValueError as err:
        print(f"fastvision bench: error: {err}", file=sys.stderr)
        return 2
    if args.plot:  # fail before minutes of benchmarking, not after
        try:
            bench.pyplot()
        except RuntimeError as err:
            print(f"fastvision bench: error: --plot: {err}", file=sys.stderr)
            return 2
    threads_why = ""
    if args.threads:
        torch.set_num_threads(args.threads)
    elif args.quick:  # the one-minute promise on a machine other jobs share
        threads_why = bench.busy_threads(device)
        if threads_why:
            torch.set_num_threads(1)
            print(f"fastvision bench: {threads_why}", file=sys.stderr, flush=True)
    records = bench.run(ops, device=device, dtype=args.dtype, quick=args.quick,
                        repeats=args.repeats, budget_s=args.budget, threads_why=threads_why)
    # With --json - stdout carries only the JSON, so the table goes to stderr.
    print(bench.format_tables(records), file=sys.stderr if args.json == "-" else sys.stdout)
    if args.json:
        bench.write_json(records, args.json)
    if args.plot:
        bench.plot(records, args.plot)
    return 1 if any("error" in r for r in records) else 0


# --------------------------------------------------------------------------


def _known_ops() -> str:
    try:
        from fastvision.bench import SUITES
        return ", ".join(SUITES)
    except ImportError:  # the compiled library does not load; `fastvision info` says why
        return "see `fastvision info`"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastvision", description=fastvision.__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"fastvision {fastvision.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="versions, compiled libraries, usable backends, devices")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    info.set_defaults(func=cmd_info)

    bench = sub.add_parser(
        "bench", help="time fastvision against the reference (and the anchor library where installed)",
        description="Runs the benchmark suites (all when no OPS are given) and prints a table per "
                    "op and case. FASTVISION_BENCH_TINY=1 shrinks every case (a smoke test).")
    bench.add_argument("ops", nargs="*", metavar="OPS", help=f"ops to benchmark (default: all): {_known_ops()}")
    bench.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    bench.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    bench.add_argument("--quick", action="store_true",
                       help="the quick cases, fewer samples; slow baselines timed once or skipped, "
                            "with the reason in the table; within a minute on 2 CPU cores (past "
                            "its time budget the rest is timed once)")
    bench.add_argument("--json", metavar="FILE", help="write the results as JSON ('-': stdout)")
    bench.add_argument("--plot", metavar="FILE", help="write a speedup bar chart (needs matplotlib)")
    bench.add_argument("--repeats", type=int, metavar="N",
                       help="at most N timed samples per measurement (default: 20; --quick: 5)")
    bench.add_argument("--budget", type=float, metavar="SECONDS",
                       help="stop sampling a measurement after this long; at least one sample is "
                            "always taken (default: 2; --quick: 0.25)")
    bench.add_argument("--threads", type=int, metavar="N",
                       help="CPU threads for torch and the CPU kernels (default: torch's choice; --quick "
                            "takes 1 when other jobs keep every CPU busy); 1 keeps timings steady on "
                            "a machine other jobs share")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
