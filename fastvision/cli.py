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


def collect_info() -> dict:
    """What is installed and which backends run where; never raises for a broken build."""
    info = {
        "fastvision": fastvision.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _triton_version(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "gpus": [],
    }
    try:
        from fastvision import _extension
        info.update(C_loaded=True, C_error=None, C_cuda_built=_extension.CUDA_BUILT,
                    C_cuda_loaded=_extension.CUDA_LOADED, C_cuda_error=_extension.CUDA_ERROR)
        from fastvision import benchmark
        info["cpu"] = benchmark.cpu_name()
        info["backends"] = {dev: benchmark.usable_backends(dev) for dev in ("cpu", "cuda")}
    except ImportError as err:  # _C missing or broken: say so instead of a traceback
        info.update(C_loaded=False, C_error=str(err), C_cuda_built=None, C_cuda_loaded=False,
                    C_cuda_error=None, cpu=platform.processor() or platform.machine(), backends={})
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            info["gpus"].append({"index": i, "name": torch.cuda.get_device_name(i),
                                 "compute_capability": f"{major}.{minor}"})
    return info


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
    for device, backends in info["backends"].items():
        usable = [b for b, why in backends.items() if why is None]
        reasons = {why for why in backends.values() if why is not None}
        if not usable and len(reasons) == 1:  # e.g. no GPU: one reason for all
            lines.append(f"backends on {device:<5}none: {reasons.pop()}")
            continue
        lines.append(f"backends on {device:<5}usable: {', '.join(usable) or 'none'}")
        lines += [f"{'':17}{b}: {why}" for b, why in backends.items() if why is not None]
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
    from fastvision import benchmark
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        ops = benchmark.validate(args.ops, device, args.dtype)
    except ValueError as err:
        print(f"fastvision bench: error: {err}", file=sys.stderr)
        return 2
    if args.plot:  # fail before minutes of benchmarking, not after
        try:
            benchmark.pyplot()
        except RuntimeError as err:
            print(f"fastvision bench: error: --plot: {err}", file=sys.stderr)
            return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    records = benchmark.run(ops, device=device, dtype=args.dtype, quick=args.quick,
                            repeats=args.repeats, budget_s=args.budget)
    # With --json - stdout carries only the JSON, so the table goes to stderr.
    print(benchmark.format_tables(records), file=sys.stderr if args.json == "-" else sys.stdout)
    if args.json:
        benchmark.write_json(records, args.json)
    if args.plot:
        benchmark.plot(records, args.plot)
    return 1 if any("error" in r for r in records) else 0


# --------------------------------------------------------------------------


def _known_ops() -> str:
    try:
        from fastvision.benchmark import SUITES
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
                       help="the quick cases only, skipping the reference where it takes minutes")
    bench.add_argument("--json", metavar="FILE", help="write the results as JSON ('-': stdout)")
    bench.add_argument("--plot", metavar="FILE", help="write a speedup bar chart (needs matplotlib)")
    bench.add_argument("--repeats", type=int, metavar="N",
                       help="at most N timed samples per measurement (default: 20)")
    bench.add_argument("--budget", type=float, metavar="SECONDS",
                       help="stop sampling a measurement after this long; at least one sample is "
                            "always taken (default: 2)")
    bench.add_argument("--threads", type=int, metavar="N",
                       help="CPU threads for torch and the CPU kernels (default: torch's choice); "
                            "1 keeps timings steady on a machine other jobs share")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
