"""The compiled entry points, called directly (torch.ops.fastvision.*, as torch.compile,
torch.export and users call them): the reported crashes, hangs and silent wrong answers
now raise clear errors.

Every reproduction runs in a child process (all of them in one, restarted after a
crash), so a regression fails its test instead of killing pytest. Errors are ValueError
"fastvision.<op>: <argument> ..." (MemoryError "... out of memory allocating ..." for a
failed allocation) and never name a source file.
"""

import os
import re
import subprocess
import sys

import pytest
import torch

import fastvision.ops  # noqa: F401 - registers the ops

ops = torch.ops.fastvision
HERE = os.path.abspath(__file__)

# ---------------------------------------------------------------------------
# Inputs


def _scan(batch=2, dim=64, L=32, N=16, **over):
    """Valid selective_scan_fwd arguments (dict in schema order), with overrides."""
    a = dict(u=torch.randn(batch, dim, L), delta=torch.rand(batch, dim, L), A=-torch.rand(dim, N),
             B=torch.randn(dim, N), C=torch.randn(dim, N), D=torch.randn(dim), z=None, delta_bias=torch.zeros(dim),
             delta_softplus=True, reverse=False, chunk_len=8)
    a.update(over)
    return a


def _bi(**over):
    f = _scan()
    a = dict(list(f.items())[:8])
    b = _scan()
    a.update(u_b=b["u"], delta_b=b["delta"], A_b=b["A"], B_b=b["B"], C_b=b["C"], D_b=b["D"],
             delta_bias_b=b["delta_bias"], delta_softplus=True, chunk_len=8)
    a.update(over)
    return a


def _bwd(**over):
    f = _scan()
    out, last, states = ops.selective_scan_fwd(*f.values())
    fw = dict(list(f.items())[:8])
    a = dict(dout=torch.randn_like(out), dlast_state=torch.randn_like(last), **fw, chunk_states=states,
             delta_softplus=True, reverse=False, chunk_len=8)
    a.update(over)
    return a


def _na(**over):
    q = torch.randn(1, 16, 2, 8)
    a = dict(query=q, key=torch.randn_like(q), value=torch.randn_like(q), rpb=None, kernel_size=[3], dilation=[1],
             stride=[1], is_causal=[False], scale=0.5)
    a.update(over)
    return a


def _na_bwd(**over):
    f = _na()
    out, lse = ops.na_fwd(*f.values())
    a = dict(dout=torch.randn_like(out), dlse=None, query=f["query"], key=f["key"], value=f["value"], rpb=None,
             out=out, lse=lse, kernel_size=[3], dilation=[1], stride=[1], is_causal=[False], scale=0.5)
    a.update(over)
    return a


# ---------------------------------------------------------------------------
# The reproductions: name -> (call, expected exception (None: must run), regex its message matches).

CASES = {}


def case(name, exc, match):
    def register(fn):
        CASES[name] = (fn, exc, match)
        return fn
    return register


@case("scan_fwd_int32_u", ValueError,
      r"^fastvision\.selective_scan_fwd: u must be float32, float16, bfloat16 or float64; got int32$")
def _():
    ops.selective_scan_fwd(*_scan(u=torch.randint(0, 3, (2, 64, 32), dtype=torch.int32)).values())


@case("scan_fwd_int32_delta", ValueError, r"^fastvision\.selective_scan_fwd: delta must be float32 .*got int32$")
def _():
    ops.selective_scan_fwd(*_scan(delta=torch.randint(0, 3, (2, 64, 32), dtype=torch.int32)).values())


@case("scan_fwd_long_u_16_long_B", ValueError,
      r"^fastvision\.selective_scan_fwd: B must have shape \(batch, G, N, L\) = \(1, 1, 16, 67108864\); "
      r"got \(1, 1, 16, 16\)$")
def _():
    L = 2**26  # uninitialised: never touched, so never paged in
    ops.selective_scan_fwd(*_scan(batch=1, dim=1, L=L, N=16, u=torch.empty(1, 1, L), delta=torch.empty(1, 1, L),
                                  A=-torch.rand(1, 16), B=torch.randn(1, 1, 16, 16), C=torch.randn(1, 16),
                                  D=torch.randn(1), delta_bias=torch.zeros(1)).values())


@case("scan_fwd_long_u_flat_B", ValueError, r"^fastvision\.selective_scan_fwd: B must have shape \(dim, N\)")
def _():
    L = 2**26
    ops.selective_scan_fwd(*_scan(batch=1, dim=1, L=L, N=16, u=torch.empty(1, 1, L), delta=torch.empty(1, 1, L),
                                  A=-torch.rand(1, 16), B=torch.randn(16), C=torch.randn(1, 16),
                                  D=torch.randn(1), delta_bias=torch.zeros(1)).values())


@case("scan_fwd_D_1_for_dim_64", ValueError,
      r"^fastvision\.selective_scan_fwd: D must have shape \(dim,\) = \(64,\); got \(1,\)$")
def _():
    ops.selective_scan_fwd(*_scan(D=torch.randn(1)).values())


@case("scan_fwd_short_const_B", ValueError,
      r"^fastvision\.selective_scan_fwd: B must have shape \(dim, N\) .*= \(64, 16\); got \(64, 15\)$")
def _():
    ops.selective_scan_fwd(*_scan(B=torch.randn(64, 15)).values())


@case("scan_fwd_short_var_C", ValueError,
      r"^fastvision\.selective_scan_fwd: C must have shape \(batch, G, N, L\) = \(2, 2, 16, 32\); got \(2, 2, 16, 31\)$")
def _():
    ops.selective_scan_fwd(*_scan(C=torch.randn(2, 2, 16, 31)).values())


@case("scan_fwd_noncontiguous_delta", ValueError,
      r"^fastvision\.selective_scan_fwd: delta must be contiguous \(row-major\); got strides")
def _():
    ops.selective_scan_fwd(*_scan(delta=torch.rand(2, 32, 64).transpose(1, 2)).values())


@case("scan_fwd_groups_not_dividing_dim", ValueError,
      r"^fastvision\.selective_scan_fwd: B: the number of groups G = 3 .*divide dim = 64")
def _():
    ops.selective_scan_fwd(*_scan(B=torch.randn(2, 3, 16, 32)).values())


@case("scan_fwd_A_wrong_accumulate_dtype", ValueError,
      r"^fastvision\.selective_scan_fwd: A must be float32 \(the accumulate dtype")
def _():
    ops.selective_scan_fwd(*_scan(A=-torch.rand(64, 16, dtype=torch.float64)).values())


@case("scan_fwd_chunk_len_0", ValueError, r"^fastvision\.selective_scan_fwd: chunk_len must be >= 1; got 0$")
def _():
    ops.selective_scan_fwd(*_scan(chunk_len=0).values())


@case("scan_fwd_chunk_len_negative", ValueError, r"^fastvision\.selective_scan_fwd: chunk_len must be >= 1; got -1$")
def _():
    ops.selective_scan_fwd(*_scan(chunk_len=-1).values())


@case("bi_scan_short_u_b", ValueError, r"^fastvision\.bi_selective_scan_fwd: delta_b must have shape .*"
      r"\(batch, dim, L\) like u_b = \(2, 64, 31\); got \(2, 64, 32\)$")
def _():
    ops.bi_selective_scan_fwd(*_bi(u_b=torch.randn(2, 64, 31)).values())


@case("bi_scan_u_b_and_its_tensors_short", ValueError,
      r"^fastvision\.bi_selective_scan_fwd: u_b must have u's shape \(batch, dim, L\) = \(2, 64, 32\); got \(2, 64, 31\)$")
def _():
    a = _bi(u_b=torch.randn(2, 64, 31), delta_b=torch.rand(2, 64, 31))
    ops.bi_selective_scan_fwd(*a.values())


@case("bi_scan_B_b_other_layout", ValueError, r"^fastvision\.bi_selective_scan_fwd: B_b must have B's shape")
def _():
    ops.bi_selective_scan_fwd(*_bi(B_b=torch.randn(2, 1, 16, 32)).values())


@case("scan_bwd_misshaped_dout", ValueError,
      r"^fastvision\.selective_scan_bwd: dout must have shape \(batch, dim, L\) like u = \(2, 64, 32\); got \(2, 64, 31\)$")
def _():
    ops.selective_scan_bwd(*_bwd(dout=torch.randn(2, 64, 31)).values())


@case("scan_bwd_misshaped_dlast_state", ValueError,
      r"^fastvision\.selective_scan_bwd: dlast_state must have shape \(batch, dim, N\) = \(2, 64, 16\); got \(2, 64, 15\)$")
def _():
    ops.selective_scan_bwd(*_bwd(dlast_state=torch.randn(2, 64, 15)).values())


@case("scan_bwd_chunk_states_from_other_chunking", ValueError,
      r"^fastvision\.selective_scan_bwd: chunk_states must have shape \(batch, dim, ceil\(L / chunk_len\), N\)")
def _():
    ops.selective_scan_bwd(*_bwd(chunk_len=16).values())


@case("scan_bwd_noncontiguous_dout", ValueError, r"^fastvision\.selective_scan_bwd: dout must be contiguous")
def _():
    ops.selective_scan_bwd(*_bwd(dout=torch.randn(2, 32, 64).transpose(1, 2)).values())


@case("na_fwd_dilation_2_63_minus_1", ValueError,
      r"^fastvision\.na_fwd: kernel_size\[0\] \* dilation\[0\] must not exceed the length of spatial axis 0 "
      r"\(query\.size\(1\) = 16\); got kernel_size 3 and dilation 9223372036854775807$")
def _():
    ops.na_fwd(*_na(dilation=[2**63 - 1]).values())


@case("na_fwd_kernel_size_huge", ValueError, r"^fastvision\.na_fwd: kernel_size\[0\] \* dilation\[0\] must not exceed")
def _():
    ops.na_fwd(*_na(kernel_size=[2**62], stride=[1]).values())


@case("na_fwd_negative_stride", ValueError, r"^fastvision\.na_fwd: stride\[0\] must be >= 1; got -1$")
def _():
    ops.na_fwd(*_na(stride=[-1]).values())


@case("na_fwd_list_length", ValueError,
      r"^fastvision\.na_fwd: dilation must have one entry per spatial axis \(1 for a 4-D query\); got 2$")
def _():
    ops.na_fwd(*_na(dilation=[1, 1]).values())


@case("na_fwd_int_query", ValueError, r"^fastvision\.na_fwd: query must be float32, .*; got int64$")
def _():
    ops.na_fwd(*_na(query=torch.zeros(1, 16, 2, 8, dtype=torch.int64)).values())


@case("na_fwd_heads_not_dividing", ValueError, r"^fastvision\.na_fwd: the number of key/value heads \(key\.size\(-2\) = 3\)")
def _():
    ops.na_fwd(*_na(key=torch.randn(1, 16, 3, 8), value=torch.randn(1, 16, 3, 8)).values())


@case("na_fwd_rpb_shape", ValueError,
      r"^fastvision\.na_fwd: rpb must have shape \(heads, 2\*kernel_size\[0\]-1\) = \(2, 5\); got \(2, 4\)$")
def _():
    ops.na_fwd(*_na(rpb=torch.randn(2, 4)).values())


@case("na_bwd_misshaped_dout", ValueError, r"^fastvision\.na_bwd: dout must have shape \(batch, L, heads, head_dim_v\)")
def _():
    ops.na_bwd(*_na_bwd(dout=torch.randn(1, 15, 2, 8)).values())


@case("na_bwd_lse_dtype", ValueError, r"^fastvision\.na_bwd: lse must be float32 \(the accumulate dtype")
def _():
    a = _na_bwd()
    a["lse"] = a["lse"].double()
    ops.na_bwd(*a.values())


@case("na_bwd_misshaped_dlse", ValueError, r"^fastvision\.na_bwd: dlse must have shape \(batch, L, heads\) like lse")
def _():
    ops.na_bwd(*_na_bwd(dlse=torch.randn(1, 16)).values())


# Valid: an empty batch allows axis lengths near 2^63 (no overflow, no per-position tables).
@case("scan_fwd_empty_batch_huge_L", None, "")
def _():
    L = 2**63 - 1
    out, last, states = ops.selective_scan_fwd(*_scan(batch=0, dim=1, L=L, N=4, u=torch.empty(0, 1, L),
                                                      delta=torch.empty(0, 1, L), A=-torch.rand(1, 4),
                                                      B=torch.randn(1, 4), C=torch.randn(1, 4), D=torch.randn(1),
                                                      delta_bias=torch.zeros(1), chunk_len=2**62).values())
    assert out.shape == (0, 1, L) and states.shape == (0, 1, 2, 4)


@case("na_fwd_empty_batch_huge_L", None, "")
def _():
    q = torch.empty(0, 2**62, 1, 1)
    out, lse = ops.na_fwd(q, q, q, None, [2**61], [2], [1], [False], 1.0)
    assert out.shape == (0, 2**62, 1, 1) and lse.shape == (0, 2**62, 1)


# ---------------------------------------------------------------------------
# Running the cases in child processes


def _child_main(names):
    """Runs the named cases in order: 'S name' before each, 'R name <result>' after."""
    for name in names:
        print(f"S {name}", flush=True)
        try:
            CASES[name][0]()
            result = "ok"
        except BaseException as e:  # noqa: BLE001 - every outcome is reported
            result = f"{type(e).__name__} {str(e)}".replace("\n", " ")
        print(f"R {name} {result}", flush=True)


def _run_in_children(names, timeout=120):
    """{name: 'ok' | '<ExceptionType> <message>' | 'CRASHED ...' | 'HUNG'}; a new child after a crash."""
    results, todo = {}, list(names)
    while todo:
        try:
            proc = subprocess.run([sys.executable, HERE, *todo], capture_output=True, text=True, timeout=timeout)
            out, err, rc = proc.stdout, proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            err, rc = "", None
        started = None
        for line in out.splitlines():
            kind, _, rest = line.partition(" ")
            name, _, result = rest.partition(" ")
            if kind == "S":
                started = name
            elif kind == "R":
                results[name] = result
                started = None
        if started is not None:  # died or hung in this case: record it, go on in a new child
            results[started] = "HUNG" if rc is None else f"CRASHED (exit {rc}): {err[-2000:]}"
        elif any(n not in results for n in todo):
            raise AssertionError(f"child failed outside the cases (exit {rc}): {err[-2000:]}")
        todo = [n for n in todo if n not in results]
    return results


@pytest.fixture(scope="module")
def results():
    return _run_in_children(list(CASES))


@pytest.mark.parametrize("name", list(CASES))
def test_direct_call_reproduction(name, results):
    _, exc, match = CASES[name]
    result = results[name]
    if exc is None:
        assert result == "ok", f"{name}: expected to run, got {result[:2000]}"
        return
    etype, _, msg = result.partition(" ")
    assert etype == exc.__name__, f"{name}: expected {exc.__name__}, got {result[:2000]}"
    assert re.search(match, msg), f"{name}: message {msg!r} does not match {match!r}"
    for leak in ("/csrc/", ".cpp", ".h:", ".h,", "API call failed", "CHECK FAILED"):
        assert leak not in msg, f"{name}: message names a source path: {msg!r}"


def test_valid_direct_calls_still_run():
    """The checks accept what the wrappers pass: every layout, dtypes, z, reverse, rpb, GQA."""
    for over in ({}, dict(B=torch.randn(2, 1, 16, 32), C=torch.randn(2, 4, 16, 32), z=torch.randn(2, 64, 32)),
                 dict(reverse=True, chunk_len=2**63 - 1), dict(u=torch.randn(2, 64, 32).half(),
                                                               delta=torch.rand(2, 64, 32).half())):
        out, last, states = ops.selective_scan_fwd(*_scan(**over).values())
        assert out.shape == (2, 64, 32) and last.shape == (2, 64, 16)
    ops.selective_scan_bwd(*_bwd(dlast_state=None).values())
    ops.bi_selective_scan_fwd(*_bi(z=torch.randn(2, 64, 32)).values())
    q = torch.randn(1, 6, 5, 4, 8)
    kv = torch.randn(1, 6, 5, 2, 8)
    out, lse = ops.na_fwd(q, kv, kv, None, [3, 3], [2, 1], [1, 2], [True, False], 0.3)
    ops.na_bwd(out, lse, q, kv, kv, None, out, lse, [3, 3], [2, 1], [1, 2], [True, False], 0.3)
    out, lse = ops.na_fwd(q, kv, kv, torch.randn(4, 5, 5), [3, 3], [2, 1], [1, 1], [False, False], 0.3)
    assert out.shape == (1, 6, 5, 4, 8) and lse.shape == (1, 6, 5, 4)


# ---------------------------------------------------------------------------
# Out of memory: a child with a small address-space limit.

_UNDER_ASAN = "asan" in os.environ.get("LD_PRELOAD", "")

_OOM_PRELUDE = """
import resource, torch, fastvision.ops
ops = torch.ops.fastvision
def limit_address_space(headroom):
    # What the process has mapped now plus `headroom` bytes: enough to run, not to allocate GiBs.
    vm = next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmSize:'))
    resource.setrlimit(resource.RLIMIT_AS, (vm + headroom, resource.getrlimit(resource.RLIMIT_AS)[1]))
"""


def _run_oom_child(body):
    proc = subprocess.run([sys.executable, "-c", _OOM_PRELUDE + body], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"child died (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux") or _UNDER_ASAN,
                    reason="needs Linux /proc and RLIMIT_AS (AddressSanitizer reserves terabytes of address space)")
def test_out_of_memory_names_the_allocation():
    # na_fwd's output (1, 8, 64, 2^20) float32 is 2 GiB; the inputs are a few MiB.
    out = _run_oom_child("""
q = torch.randn(1, 8, 64, 1); k = torch.randn(1, 8, 1, 1); v = torch.randn(1, 8, 1, 2**20)
ops.na_fwd(q, k, v[..., :8].contiguous(), None, [3], [1], [1], [False], 1.0)  # warm up: thread pool, allocator
limit_address_space(512 << 20)
try:
    ops.na_fwd(q, k, v, None, [3], [1], [1], [False], 1.0)
    print("no error")
except BaseException as e:
    print(type(e).__name__, str(e))
""")
    assert out == ("MemoryError fastvision.na_fwd: out of memory allocating out: shape (1, 8, 64, 1048576), float32, "
                   "2147483648 bytes"), out


@pytest.mark.skipif(not sys.platform.startswith("linux") or _UNDER_ASAN,
                    reason="needs Linux /proc and RLIMIT_AS (AddressSanitizer reserves terabytes of address space)")
def test_out_of_memory_in_parallel_workers_is_raised_not_aborted():
    # The backward keeps [chunk][N][16 lanes] states per task: 2 x 1 GiB per task for
    # N = 2^16, chunk = L = 256, while its inputs and outputs are small. The allocation
    # fails inside the workers of the parallel loop (4 tasks); the error must reach Python.
    out = _run_oom_child("""
batch, dim, L, N = 4, 1, 256, 2**16
u = torch.randn(batch, dim, L); delta = torch.rand(batch, dim, L); A = -torch.rand(dim, N)
B = torch.randn(dim, N); C = torch.randn(dim, N); D = torch.randn(dim); bias = torch.zeros(dim)
states = torch.zeros(batch, dim, 1, N)
ops.selective_scan_fwd(u[..., :8].contiguous(), delta[..., :8].contiguous(), A[:, :4].contiguous(),
                       B[:, :4].contiguous(), C[:, :4].contiguous(), D, None, bias, False, False, 8)  # warm up
limit_address_space(512 << 20)
try:
    ops.selective_scan_bwd(torch.randn(batch, dim, L), None, u, delta, A, B, C, D, None, bias, states, False, False, L)
    print("no error")
except BaseException as e:
    print(type(e).__name__, str(e))
""")
    assert out == "MemoryError fastvision.selective_scan_bwd: out of memory allocating per-thread scratch", out


if __name__ == "__main__":
    _child_main(sys.argv[1:])
