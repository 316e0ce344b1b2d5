"""Output of a benchmark run: text tables, JSON, a speedup plot.

Everything here reads the records :func:`fastvision.bench.core.run` returns,
so the table, the JSON and the plot always agree.
"""

from __future__ import annotations

import json
import os

from .core import MEMORY_METHOD, REFERENCE


def _3digits(x: float) -> str:
    """At least three significant digits, no exponent: 0.123, 1.23, 12.3, 123, 12345."""
    r = float(f"{x:.3g}")  # pick the precision after rounding: 9.996 prints as 10.0, not 10.00
    return f"{x:.0f}" if r >= 100 else f"{x:.1f}" if r >= 10 else f"{x:.2f}" if r >= 0.1 else f"{x:.3f}"


def _fmt_ms(ms) -> str:
    return "n/a" if ms is None else _3digits(ms)


def _fmt_x(x) -> str:
    return "n/a" if x is None else _3digits(x) + "x"


def _fmt_mib(nbytes) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 2**20:.1f}"


def _render(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells):  # implementation name left-aligned, numbers right-aligned
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return [line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)]


def _header_lines(records: list[dict]) -> list[str]:
    first = records[0]
    out = [f"fastvision {first['fastvision']} | torch {first['torch']} | triton {first['triton'] or '-'} | "
           f"python {first['python']} | {first['device_type']}: {first['device']}"
           + (f", torch threads: {first['threads']}" if first["device_type"] == "cpu" else ""),
           "fwd: forward with autograd recording; fwd+bwd: forward + gradients of every input; "
           "median ms (* one sample: the implementation is timed once, or one call outlasted the time budget).",
           "Set-up an implementation needs once per case (masks, index tables) runs before timing, "
           "outside these times; its cost is listed under the table.",
           f"peak MiB: {MEMORY_METHOD[first['device_type']]}."]
    if first.get("threads_why"):
        out.append(f"threads: {first['threads_why']}.")
    if first["dtype"] != "float32" and first["device_type"] == "cpu":
        out.append(f"note: the CPU kernels take {first['dtype']} inputs and outputs but compute in float32.")
    loads = [r["load_avg_1m"] for r in records if r.get("load_avg_1m") is not None]
    if first["device_type"] == "cpu" and loads and max(loads) > 1.5 * (first["cpu_count"] or 1):
        out.append(f"warning: load average up to {max(loads):.1f} on {first['cpu_count']} CPUs during this run: "
                   "other processes competed for the CPUs, so these timings are noisy"
                   + (" (--threads 1 steadies them)." if first["threads"] > 1 else "."))
    if first["device_type"] == "cuda":
        if any(r.get("bandwidth_bound") for r in records):
            out.append("GB/s: the op's minimal traffic (inputs read once, output written once; backward "
                       "reads dout + inputs, writes input grads) / time; % of the device's peak DRAM bandwidth.")
        if any("fwd_useful_tflops" in r for r in records):
            out.append("TFLOP/s: useful FLOPs only (QK^T and PV over each query's window; backward "
                       "counted as 2.5x forward) / time, for every implementation alike.")
    return out


def _op_notes(recs: list[dict]) -> list[str]:
    """What every implementation's timing includes, once per op."""
    notes = {}
    for r in recs:
        notes.setdefault(r["implementation"], r.get("note") or "")
    width = max(len(n) for n in notes)
    lines = [f"{recs[0]['op']}: {recs[0]['config']}" if recs[0].get("config") else f"{recs[0]['op']}:",
             "what each timing includes:"]
    lines += [f"  {name.ljust(width)}  {note}" for name, note in notes.items() if note]
    return lines


def _ms_cell(r: dict, key: str) -> str:
    text = _fmt_ms(r.get(f"{key}_ms"))
    return text + "*" if r.get(f"{key}_samples") == 1 and not r.get("tiny") else text


def _case_table(recs: list[dict]) -> list[str]:
    cuda = recs[0]["device_type"] == "cuda"
    bandwidth = cuda and any(r.get("bandwidth_bound") for r in recs)
    tflops = cuda and any("fwd_useful_tflops" in r for r in recs)
    header = ["implementation", "fwd ms", "fwd+bwd ms", "peak MiB", "speedup fwd", "speedup fwd+bwd"]
    if bandwidth:
        header += ["GB/s fwd", "GB/s fwd+bwd", "% peak fwd+bwd"]
    if tflops:
        header += ["TFLOP/s fwd", "TFLOP/s fwd+bwd"]
    rows, after = [], []
    for r in recs:
        name = r["implementation"]
        if "skipped" in r:
            rows.append([name, "not timed", *["-"] * (len(header) - 2)])
            after.append(f"  not timed: {name}: {r['skipped']}")
            continue
        if "error" in r:
            rows.append([name, "error: " + r["error"][:60], *[""] * (len(header) - 2)])
            continue
        row = [name, _ms_cell(r, "fwd"), _ms_cell(r, "fwd_bwd"), _fmt_mib(r.get("peak_mem_bytes")),
               _fmt_x(r.get("speedup_fwd")), _fmt_x(r.get("speedup_fwd_bwd"))]
        if bandwidth:
            frac = r.get("fwd_bwd_bandwidth_fraction")
            row += [f"{r['fwd_bandwidth_gbps']:.0f}", f"{r['fwd_bwd_bandwidth_gbps']:.0f}",
                    f"{100 * frac:.0f}%" if frac is not None else "-"]
        if tflops:
            row += [f"{r['fwd_useful_tflops']:.1f}", f"{r['fwd_bwd_useful_tflops']:.1f}"]
        rows.append(row)
        if r.get("sampling") == "once" and r.get("sampling_why"):
            after.append(f"  * {name}: {r['sampling_why']}")
        if r.get("setup_ms") is not None:
            after.append(f"  set-up (once per case, not timed): {name}: {_fmt_ms(r['setup_ms'])} ms, "
                         f"holds {_fmt_mib(r.get('setup_bytes'))} MiB")
    if all(r.get("forward_only") for r in recs):  # not differentiable: no fwd+bwd columns
        keep = [i for i, h in enumerate(header) if "fwd+bwd" not in h]
        header = [header[i] for i in keep]
        rows = [[row[i] for i in keep] for row in rows]
    out = _render(header, rows) + after
    if not any(r["implementation"] == REFERENCE and r.get("fwd_ms") for r in recs):
        out.append("  (no reference timing: speedups n/a)")
    return out


def format_tables(records: list[dict]) -> str:
    """One table per op and case, each op's notes (what a timing includes) above its first table."""
    if not records:
        return "no benchmark ran"
    out = _header_lines(records)
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["op"], r["case"]), []).append(r)
    seen_ops = set()
    for (op, case), recs in groups.items():
        if op not in seen_ops:
            seen_ops.add(op)
            out += ["", *_op_notes([r for r in records if r["op"] == op])]
        shape = " ".join(f"{k}={v}" for k, v in recs[0]["shape"].items())
        out += ["", f"{op} / {case} ({shape}) {recs[0]['dtype']}"]
        out += _case_table(recs)
    return "\n".join(out)


def write_json(records: list[dict], path: str) -> None:
    text = json.dumps(records, indent=1)
    if path == "-":
        print(text)
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text + "\n")


def pyplot():
    """matplotlib.pyplot (file output only), or RuntimeError saying how to install it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise RuntimeError("plotting needs matplotlib: pip install matplotlib "
                           "(or pip install 'fastvision[bench]')") from err
    return plt


def plot(records: list[dict], path: str) -> None:
    """Bar chart of the speedup over the reference (log scale): a row per op,
    fwd and fwd+bwd side by side, a group of bars per case."""
    plt = pyplot()
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    timed = [r for r in records if r.get("fwd_ms")]
    ops = list(dict.fromkeys(r["op"] for r in timed))
    impls = list(dict.fromkeys(r["implementation"] for r in timed if r["implementation"] != REFERENCE))
    colors = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(impls)}
    fig, axes = plt.subplots(max(len(ops), 1), 2, figsize=(12, 3.6 * max(len(ops), 1)), squeeze=False)
    for row, op in zip(axes, ops):
        recs = [r for r in timed if r["op"] == op]
        case_names = list(dict.fromkeys(r["case"] for r in recs))
        names = [n for n in impls if any(r["implementation"] == n for r in recs)]
        width = 0.8 / max(len(names), 1)
        for ax, key, title in ((row[0], "speedup_fwd", "fwd"), (row[1], "speedup_fwd_bwd", "fwd+bwd")):
            for i, name in enumerate(names):
                xs, ys = [], []
                for j, case in enumerate(case_names):
                    value = next((r.get(key) for r in recs if r["case"] == case and r["implementation"] == name), None)
                    if value:
                        xs.append(j + (i - (len(names) - 1) / 2) * width)
                        ys.append(value)
                bars = ax.bar(xs, ys, width, label=name, color=colors[name])
                ax.bar_label(bars, labels=[_fmt_x(y) for y in ys], fontsize=7, padding=1)
            ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
            ax.set_yscale("log")  # ticks at 1-2-5 steps, labelled "5x" rather than 5x10^0
            ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_xticks(range(len(case_names)), case_names)
            ax.set_ylabel("speedup vs reference")
            ax.set_title(f"{op}: {title}")
            ax.margins(y=0.15)
        row[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    first = records[0]
    threads = f", torch threads: {first['threads']}" if first["device_type"] == "cpu" else ""
    fig.suptitle(f"fastvision {first['fastvision']}, {first['dtype']}, {first['device_type']}: "
                 f"{first['device']}{threads} (dashed line: reference = 1x; higher is faster; "
                 "set-up outside the timings)", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
