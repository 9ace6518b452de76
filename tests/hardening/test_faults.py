"""Faults during merge: kill -9 at random points, a full disk, OUT inside an input, concurrent runs.

The promise under test: OUT is either absent or a complete, valid model -- never a half-written directory
that looks like a model -- and a rerun after any fault succeeds.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qvl_plugin.ckpt import sink as sink_mod
from qvl_plugin.ckpt import writer as writer_mod
from qvl_plugin.ckpt.checksums import CHECKSUM_NAME
from qvl_plugin.ckpt.convert import convert
from qvl_plugin.ckpt.merge import merge
from qvl_plugin.ckpt.view import open_checkpoint
from qvl_plugin.errors import QvlError, UsageError

try:
    from .hardening_util import assert_one_line_error, cli, run_script, script_env
except ImportError:  # tests/hardening is not a package
    from hardening_util import assert_one_line_error, cli, run_script, script_env


def _digest(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def _weight_names(model_dir: Path) -> set[str]:
    with open_checkpoint(model_dir) as ckpt:
        return {e.key for e in ckpt.entries}


def assert_absent_or_complete(out: Path, expected_names: set[str]) -> str:
    """OUT must not exist, or be a whole model: config, index naming only present shards, every tensor."""
    if not out.exists():
        return "absent"
    assert out.is_dir(), out
    assert (out / "config.json").is_file(), f"OUT exists without config.json: {sorted(os.listdir(out))}"
    index = out / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        for shard in set(weight_map.values()):
            assert (out / shard).is_file(), f"index names missing shard {shard}"
    else:
        assert (out / "model.safetensors").is_file(), sorted(os.listdir(out))
    assert _weight_names(out) == expected_names
    return "complete"


def _siblings(out: Path) -> set[str]:
    return {p.name for p in out.parent.iterdir()} - {out.name}


# --- kill -9 and concurrent runs (one driver process: imports once, forks a child per merge) ----------

@pytest.fixture(scope="module")
def driver(big_pair, tmp_path_factory):
    base, adapter = big_pair
    work = tmp_path_factory.mktemp("faults")
    args = {"base": str(base), "adapter": str(adapter), "work": str(work), "seed": 6, "kills": 6}
    env = script_env(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("fault_driver.py")), json.dumps(args)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["work"] = work
    return result


def test_kill9_at_random_points_leaves_no_partial_out(driver, big_pair):
    base, adapter = big_pair
    print(f"\nmerge durations {driver['durations']}; kills: {driver['kills']}")
    for k in driver["kills"]:
        assert k["state"] in ("absent", "complete"), k
    assert any(k["killed"] and k["state"] == "absent" for k in driver["kills"]), "no kill landed mid-run"
    # a rerun next to whatever the killed runs left behind succeeds, gives the reference bytes, and
    # clears the dead runs' temporary directories
    out = driver["work"] / "kill" / "merged"
    res = run_script("merge", adapter, "--base", base, "-o", out, "--max-shard-size", "20MB")
    assert res.returncode == 0, res.stderr
    assert _digest(out) == driver["reference"]
    assert not _siblings(out), f"stale temp dirs survive a rerun: {sorted(_siblings(out))}"


@pytest.mark.parametrize("op", ["convert-pth", "convert-peft", "extract"])
def test_kill9_during_convert_and_extract(driver, op):
    r = driver["ops"][op]
    print(f"\n{op}: {r}")
    assert r["ref_code"] == 0, r
    for k in r["kills"]:
        assert k["state"] in ("absent", "complete"), k
    assert r["rerun_code"] == 0 and r["rerun_state"] == "complete", r
    # (clearing what killed runs left is checked deterministically in test_stale_temp_*)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temp_dir_of_a_dead_run_is_cleared(small_pair, tmp_path):
    base, adapter = small_pair
    out = tmp_path / "merged"
    stale = tmp_path / f".merged.qvl-tmp-{_dead_pid()}-abc123"
    stale.mkdir()
    (stale / "model-00001-of-00002.safetensors").write_bytes(b"half")
    alive = tmp_path / f".merged.qvl-tmp-{os.getpid()}-live"  # a running process's temp dir is left alone
    alive.mkdir()
    merge(adapter, base, out, max_shard_size="100KB")
    assert not stale.exists() and alive.exists()


def test_stale_temp_file_of_a_dead_run_is_cleared(small_pair, tmp_path):
    _, adapter = small_pair
    stale = tmp_path / f".x.pth.qvl-tmp-{_dead_pid()}-abc123"
    stale.write_bytes(b"half a zip")
    convert(adapter, "pth", tmp_path / "x.pth")
    assert (tmp_path / "x.pth").is_file()
    assert not stale.exists()


@pytest.mark.parametrize("force", [False, True])
def test_concurrent_merges_into_same_out(driver, force):
    r = driver["concurrent"][str(force)]
    assert r["codes"] in ([0, 0], [0, 1]), r
    assert r["state"] == "complete" and r["same_bytes"], r
    assert not r["left"], r


# --- OUT equal to or inside an input -----------------------------------------------------------------

def test_out_equal_to_or_inside_an_input_is_refused(small_pair, tmp_path):
    base, adapter = small_pair
    before_base, before_adapter = _digest(base), _digest(adapter)
    link = tmp_path / "link-to-base"
    link.symlink_to(base)
    for out in (base, base / "sub", adapter, adapter / "merged", link, link / "sub", base / "model.safetensors.index.json"):
        for force in ([], ["--force"]):
            res = cli("merge", adapter, "--base", base, "-o", out, *force)
            assert_one_line_error(res)
    assert _digest(base) == before_base and _digest(adapter) == before_adapter
    assert not (base / "sub").exists() and not (adapter / "merged").exists()


def test_existing_out_needs_force_and_force_keeps_a_valid_model(small_pair, tmp_path):
    base, adapter = small_pair
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    assert_one_line_error(cli("merge", adapter, "--base", base, "-o", out), "exist")
    assert (out / "keep.txt").read_text() == "user data"
    res = cli("merge", adapter, "--base", base, "-o", out, "--force")
    assert res.exit_code == 0, res.output
    assert assert_absent_or_complete(out, _weight_names(base)) == "complete"


# --- OUT inside an input: convert and extract -------------------------------------------------------

def test_convert_and_extract_refuse_out_inside_input(small_pair, tmp_path):
    base, adapter = small_pair
    merged = tmp_path / "merged"
    assert cli("merge", adapter, "--base", base, "-o", merged).exit_code == 0
    before = _digest(base), _digest(adapter), _digest(merged)
    for force in ([], ["--force"]):
        for out in (adapter, adapter / "sub"):
            assert_one_line_error(cli("convert", adapter, "--to", "peft", "-o", out, *force))
        assert_one_line_error(cli("convert", adapter, "--to", "pth", "-o", adapter / "x.pth", *force))
        assert_one_line_error(cli("convert", adapter, "--to", "pth", "-o", adapter / "adapter_model.safetensors", *force))
        for out in (base, base / "sub", merged, merged / "sub"):
            assert_one_line_error(cli("extract", merged, "--base", base, "-o", out, "--rank", 2, *force))
    assert (_digest(base), _digest(adapter), _digest(merged)) == before


# --- OUT inside an input, through the library -------------------------------------------------------

def test_out_inside_input_refused_by_library(small_pair, tmp_path):
    base, adapter = small_pair
    before = _digest(base), _digest(adapter)
    link = tmp_path / "link-to-base"
    link.symlink_to(base)
    for out in (base, base / "sub", adapter, adapter / "merged", link, link / "sub", base.parent):
        for force in (False, True):
            with pytest.raises(UsageError):
                merge(adapter, base, out, force=force)
    assert (_digest(base), _digest(adapter)) == before
    assert not (base / "sub").exists() and not (adapter / "merged").exists()


# --- a full disk: injected ENOSPC at every kind of write ----------------------------------------------

class _Disk:
    """A disk with ``budget`` bytes left: writes through the writer's files and kernel copies fail after it."""

    def __init__(self, budget: int):
        self.budget = budget
        self.hits = 0

    def take(self, n: int, whole: bool = False) -> int:
        """Bytes that fit (a short write); ``whole``: all or ENOSPC (a file copied in one call)."""
        if self.budget <= 0 or (whole and n > self.budget):
            self.hits += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = min(n, self.budget)
        self.budget -= n
        return n


def _install_full_disk(monkeypatch, disk: _Disk) -> None:
    """ENOSPC once ``disk`` is spent: at the shard sinks' writes (short writes first, direct or cached), the
    kernel copies, copied support files and written JSON."""
    real_write_all = sink_mod._write_all
    real_cfr = getattr(os, "copy_file_range", None)
    real_copyfile = shutil.copyfile
    real_write_text = Path.write_text

    def fake_write_all(fd, view):
        view = memoryview(view).cast("B")
        while len(view):
            n = disk.take(len(view))
            real_write_all(fd, view[:n])
            view = view[n:]

    def fake_cfr(src, dst, count, offset_src=None, offset_dst=None):
        return real_cfr(src, dst, disk.take(count), offset_src, offset_dst)

    def fake_copyfile(src, dst, *a, **kw):
        disk.take(max(1, os.path.getsize(src)), whole=True)
        return real_copyfile(src, dst, *a, **kw)

    def fake_write_text(self, data, *a, **kw):
        disk.take(max(1, len(data.encode() if isinstance(data, str) else data)), whole=True)
        return real_write_text(self, data, *a, **kw)

    monkeypatch.setattr(sink_mod, "_write_all", fake_write_all)
    if real_cfr is not None:
        monkeypatch.setattr(os, "copy_file_range", fake_cfr)
    monkeypatch.setattr(shutil, "copyfile", fake_copyfile)
    monkeypatch.setattr(Path, "write_text", fake_write_text)


@pytest.mark.parametrize("direct_io", [True, False], ids=["direct", "page-cache"])
@pytest.mark.parametrize("dtype", ["auto", "bf16"])  # auto: kernel copies of unchanged tensors; bf16: every byte written
def test_enospc_midway_gives_clear_error_and_removes_temp(small_pair, tmp_path, monkeypatch, dtype, direct_io):
    base, adapter = small_pair
    ref = merge(adapter, base, tmp_path / "ref", max_shard_size="100KB", dtype=dtype, direct_io=direct_io)
    total = sum(p.stat().st_size for p in (tmp_path / "ref").iterdir())
    for left in (0, total // 10, total // 2, total * 9 // 10, total - 100):  # the last: fails on the index/config
        out = tmp_path / "outdir" / f"merged-{left}"
        out.parent.mkdir(exist_ok=True)
        disk = _Disk(left)
        with monkeypatch.context() as m:
            _install_full_disk(m, disk)
            with pytest.raises(QvlError) as info:
                merge(adapter, base, out, max_shard_size="100KB", dtype=dtype, direct_io=direct_io)
        assert disk.hits, "the injected full disk was never hit"
        msg = str(info.value)
        assert "no space left" in msg.lower() and "\n" not in msg, msg
        assert not out.exists(), f"partial OUT after ENOSPC with {left} bytes left"
        assert os.listdir(out.parent) == [], f"temp dir left after ENOSPC with {left} bytes left: {os.listdir(out.parent)}"
    assert ref.files


def _can_mount() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("mount") is not None


@contextlib.contextmanager
def small_tmpfs(tmp_path: Path, size: str = "30m"):
    """A real, small file system (tmpfs) mounted for the block; skips without the right to mount."""
    if not _can_mount():
        pytest.skip("needs root to mount a small tmpfs")
    mnt = tmp_path / "small-fs"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("mount -t tmpfs not permitted here")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_full_disk_real_tmpfs(big_pair, tmp_path):
    """A real full file system (30 MB tmpfs, ~100 MB model): clear error, nothing left on it."""
    base, adapter = big_pair
    with small_tmpfs(tmp_path) as mnt:
        with pytest.raises(QvlError, match="(?i)no space left"):
            merge(adapter, base, mnt / "merged", max_shard_size="20MB")
        assert os.listdir(mnt) == [], f"partial output left on the full disk: {os.listdir(mnt)}"
        res = cli("merge", adapter, "--base", base, "-o", mnt / "merged", "--max-shard-size", "20MB")
        assert_one_line_error(res, "no space left")
        assert os.listdir(mnt) == []
        # the adapter is ~50 MB (a 200k-row lm_head): 30 MB cannot hold it
        dump = tmp_path / "dump.pth"
        assert cli("convert", adapter, "--to", "pth", "-o", dump).exit_code == 0
        res = cli("convert", dump, "--to", "peft", "-o", mnt / "peft", "--adapter-config", adapter / "adapter_config.json")
        assert_one_line_error(res, "no space left")
        assert os.listdir(mnt) == []
        res = cli("convert", adapter, "--to", "pth", "-o", mnt / "a.pth", debug=False)
        assert res.exit_code == 1 and os.listdir(mnt) == [], (res.output, os.listdir(mnt))


def test_full_disk_convert_to_pth_is_a_clear_error(big_pair, tmp_path):
    _, adapter = big_pair
    with small_tmpfs(tmp_path) as mnt:
        res = cli("convert", adapter, "--to", "pth", "-o", mnt / "a.pth")
        assert os.listdir(mnt) == []
        assert_one_line_error(res, "no space left")


# --- output verification before the rename ----------------------------------------------------------

def _corrupt_truncate(tmp: Path) -> None:
    shard = sorted(tmp.glob("*.safetensors"))[-1]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 1)


def _corrupt_shape(tmp: Path) -> None:
    """Same byte count, transposed shape: only a header-vs-plan check can notice."""
    shard = sorted(tmp.glob("*.safetensors"))[0]
    raw = shard.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    name = next(k for k, v in header.items() if k != "__metadata__" and len(v["shape"]) == 2 and v["shape"][0] != v["shape"][1])
    header[name]["shape"] = header[name]["shape"][::-1]
    new = json.dumps(header, separators=(",", ":")).encode()
    new += b" " * (n - len(new))
    assert len(new) == n
    shard.write_bytes(raw[:8] + new + raw[8 + n :])


def _corrupt_rename(tmp: Path) -> None:
    shard = sorted(tmp.glob("*.safetensors"))[0]
    raw = bytearray(shard.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(bytes(raw[8 : 8 + n]))
    name = next(k for k in header if k != "__metadata__").encode()
    i = raw.index(b'"' + name + b'"', 8, 8 + n)
    raw[i + 1] = ord("X") if raw[i + 1] != ord("X") else ord("Y")  # same length, another name
    shard.write_bytes(bytes(raw))


def _corrupt_drop_shard(tmp: Path) -> None:
    sorted(tmp.glob("*.safetensors"))[-1].unlink()


def _corrupt_index(tmp: Path) -> None:
    index = tmp / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    key = next(iter(data["weight_map"]))
    data["weight_map"][key] = "model-00009-of-00009.safetensors"
    index.write_text(json.dumps(data))


@pytest.mark.parametrize("corrupt", [_corrupt_truncate, _corrupt_shape, _corrupt_rename, _corrupt_drop_shard, _corrupt_index],
                         ids=["truncated", "shape", "renamed", "missing-shard", "index"])
def test_verify_catches_corruption_between_write_and_rename(small_pair, tmp_path, monkeypatch, corrupt):
    base, adapter = small_pair
    real_verify = writer_mod.CheckpointWriter.verify
    seen = []

    def corrupting_verify(self):
        corrupt(self.tmp)
        seen.append(self.tmp)
        return real_verify(self)

    monkeypatch.setattr(writer_mod.CheckpointWriter, "verify", corrupting_verify)
    out = tmp_path / "out" / "merged"
    with pytest.raises(QvlError, match="(?i)verif"):
        merge(adapter, base, out, max_shard_size="100KB")
    assert seen, "verify was never called before the rename"
    assert not out.exists() and os.listdir(out.parent) == []


# --- --checksum: a sha256 manifest that audit verifies -----------------------------------------------

def test_checksum_manifest_matches_sha256sum(small_pair, tmp_path):
    base, adapter = small_pair
    out = tmp_path / "merged"
    merge(adapter, base, out, max_shard_size="100KB", checksum=True)
    manifest = out / CHECKSUM_NAME
    listed = {line.split("  ", 1)[1] for line in manifest.read_text().splitlines()}
    assert listed == {p.name for p in out.iterdir()} - {manifest.name}
    proc = subprocess.run(["sha256sum", "--check", "--strict", manifest.name], cwd=out, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out2 = tmp_path / "cli"
    res = cli("merge", adapter, "--base", base, "-o", out2, "--checksum", "--max-shard-size", "100KB")
    assert res.exit_code == 0, res.output
    assert (out2 / CHECKSUM_NAME).read_text() == manifest.read_text()


def test_audit_verifies_checksum_manifest(small_pair, tmp_path):
    base, adapter = small_pair
    out = tmp_path / "merged"
    merge(adapter, base, out, max_shard_size="100KB", checksum=True)
    ok = cli("audit", out, "--json")
    assert "checksum-mismatch" not in ok.stdout
    shard = sorted(out.glob("*.safetensors"))[-1]
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0xFF  # one flipped data byte: headers still valid, only the checksum can tell
    shard.write_bytes(bytes(raw))
    bad = cli("audit", out, "--json")
    assert bad.exit_code == 1, bad.output
    codes = {f["code"] for f in json.loads(bad.stdout)["findings"]}
    assert "checksum-mismatch" in codes, codes
    assert "checksum-mismatch" not in ok.stdout and ok.exit_code in (0, 1)


@pytest.mark.parametrize("line", [
    "0" * 64 + "  ../outside.txt",
    "0" * 64 + "  /etc/hostname",
    "0" * 64 + "  link-out",
    "0" * 64 + "  fifo",
    "0" * 64 + "  no-such-file",
    "not a checksum line",
    "\udcff" * 3,
])
def test_audit_survives_a_hostile_manifest(small_pair, tmp_path, line):
    """A manifest is input too: names outside OUT, links out, FIFOs, garbage -> a finding, never a read outside."""
    base, adapter = small_pair
    out = tmp_path / "merged"
    merge(adapter, base, out, max_shard_size="100KB", checksum=True)
    (tmp_path / "outside.txt").write_text("secret")
    (out / "link-out").symlink_to(tmp_path / "outside.txt")
    os.mkfifo(out / "fifo")
    manifest = out / CHECKSUM_NAME
    manifest.write_bytes(manifest.read_bytes() + line.encode("utf-8", "surrogateescape") + b"\n")
    res = cli("audit", out, "--json")
    assert isinstance(res.exception, (SystemExit, type(None))), res.exception
    assert res.exit_code == 1, res.output
    codes = {f["code"] for f in json.loads(res.stdout)["findings"]}
    assert "checksum-mismatch" in codes, codes
