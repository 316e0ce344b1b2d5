"""tools/build_wheels.py's parts that need no compiler: the local-version retag, the
fat-binary architecture reader, the architecture choice, the wheel checks and the
find-links page. (The builds themselves run in .ci/run and by hand.)"""

import base64
import hashlib
import importlib.util
import struct
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("build_wheels", ROOT / "tools" / "build_wheels.py")
bw = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bw)


def _wheel(path: Path, files: dict[str, bytes], tag="cp310-abi3-linux_x86_64") -> Path:
    info = "fastvision-0.1.0.dist-info/"
    files = {**files, info + "METADATA": b"Metadata-Version: 2.1\nName: fastvision\nVersion: 0.1.0\n",
             info + "WHEEL": f"Wheel-Version: 1.0\nTag: {tag}\n".encode()}
    whl = path / f"fastvision-0.1.0-{tag}.whl"
    with zipfile.ZipFile(whl, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr(info + "RECORD", "")
    return whl


def test_local_version_is_set_everywhere(tmp_path):
    src = _wheel(tmp_path, {"fastvision/__init__.py": b"x = 1\n"})
    out = tmp_path / "out"
    out.mkdir()
    whl = bw.set_local_version(src, "cu130", out)
    assert whl.name == "fastvision-0.1.0+cu130-cp310-abi3-linux_x86_64.whl"
    with zipfile.ZipFile(whl) as z:
        names = z.namelist()
        assert "fastvision-0.1.0+cu130.dist-info/METADATA" in names
        assert b"Version: 0.1.0+cu130\n" in z.read("fastvision-0.1.0+cu130.dist-info/METADATA")
        record = z.read("fastvision-0.1.0+cu130.dist-info/RECORD").decode().splitlines()
        for line in record:
            name, digest, size = line.rsplit(",", 2)
            if not digest:
                continue
            data = z.read(name)
            want = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            assert digest == f"sha256={want}" and int(size) == len(data), name
        assert {line.split(",")[0] for line in record} == set(names)


def _fatbin(entries):
    body = b""
    for kind, arch in entries:
        payload = b"\0" * 16
        header = struct.pack("<HHIQII", kind, 0x101, 64, len(payload), 0, len(payload)).ljust(28, b"\0")
        body += (header + struct.pack("<I", arch)).ljust(64, b"\0") + payload
    return struct.pack("<IHHQ", 0xBA55ED50, 1, 16, len(body)) + body


def test_embedded_architectures_are_read_from_the_fat_binaries(tmp_path):
    so = tmp_path / "m.so"
    so.write_bytes(b"ELF..." + _fatbin([(2, 80), (2, 90), (1, 90)]) + b"pad" + _fatbin([(2, 120), (1, 120)]))
    assert bw.embedded_archs(so) == ({80, 90, 120}, {90, 120})


def test_architectures_from_turing_without_the_embedded_parts(tmp_path, monkeypatch):
    listed = "sm_70 sm_75 sm_80 sm_86 sm_87 sm_88 sm_89 sm_90 sm_100 sm_103 sm_110 sm_120 sm_121"
    monkeypatch.setattr(bw.subprocess, "run", lambda *a, **k: type("R", (), {"stdout": listed})())
    assert bw.cuda_architectures(Path("nvcc")) == ([75, 80, 86, 89, 90, 100, 120], 120)


def test_check_refuses_bundled_torch_and_a_wrong_tag(tmp_path):
    bad = _wheel(tmp_path, {"fastvision/_C.abi3.so": b"", "fastvision/libtorch_cpu.so": b""},
                 tag="cp311-cp311-linux_x86_64")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bw, "_needed", lambda so: [])
        mp.setattr(bw, "_max_version", lambda so, prefix: None)
        problems = bw.check_wheel(bad, None)
    assert any("tag is not cp310-abi3" in p for p in problems)
    assert any("bundles torch/CUDA runtime libraries" in p for p in problems)


def test_index_page_links_every_wheel_with_its_hash(tmp_path):
    for name in ("fastvision-0.1.0+cpu-cp310-abi3-linux_x86_64.whl", "fastvision-0.1.0+cu130-cp310-abi3-linux_x86_64.whl"):
        (tmp_path / name).write_bytes(name.encode())
    page = bw.write_index(tmp_path).read_text()
    for w in tmp_path.glob("*.whl"):
        assert f'href="{w.name}#sha256={hashlib.sha256(w.read_bytes()).hexdigest()}"' in page


def test_no_nvcc_12_from_the_registry_says_why(tmp_path, monkeypatch):
    """The registry's nvidia-cuda-nvcc-cu12 has ptxas but no nvcc: a clear error."""
    target = tmp_path / "cu12" / "nvidia" / "cuda_nvcc" / "bin"
    target.mkdir(parents=True)
    (target / "ptxas").write_bytes(b"")
    monkeypatch.setattr(bw, "run", lambda *a, **k: None)
    with pytest.raises(SystemExit, match=r"no nvcc 12.x here.*ptxas.*no nvcc driver"):
        bw._registry_nvcc(12, tmp_path)
