"""Shard sinks: the O_DIRECT path writes the same bytes as the page-cache path, and falls back cleanly."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import random

import pytest

from qvl_plugin.ckpt import sink
from qvl_plugin.ckpt.sink import DirectSink, Sink, open_sink, takes_o_direct

pytestmark = pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="O_DIRECT is Linux-only")


def _script(tmp_path, seed: int):
    """A source file and a random sequence of writes and copies, sizes unaligned and crossing the staging size."""
    rng = random.Random(seed)
    src = tmp_path / "src.bin"
    src.write_bytes(rng.randbytes(200_000))
    steps = []
    for _ in range(40):
        if rng.random() < 0.5:
            steps.append(("write", rng.randbytes(rng.choice([1, 7, 4095, 4096, 4097, 12_289, 30_000]))))
        else:
            off = rng.randrange(0, 150_000)
            steps.append(("copy", off, rng.randrange(0, 50_000)))
    expect = b"".join(s[1] if s[0] == "write" else src.read_bytes()[s[1]: s[1] + s[2]] for s in steps)
    return src, steps, expect


def _run(s: Sink, src, steps) -> None:
    for step in steps:
        if step[0] == "write":
            s.write(memoryview(step[1]))
        else:
            s.copy_from(src, step[1], step[2])
    s.close(fsync=True)


@pytest.mark.parametrize("seed", range(4))
def test_direct_and_cached_sinks_write_the_same_bytes(tmp_path, monkeypatch, seed):
    monkeypatch.setattr(sink, "_STAGING", 3 * 4096)  # many flushes, tails moved to the front
    src, steps, expect = _script(tmp_path, seed)
    _run(Sink(tmp_path / "cached"), src, steps)
    d = open_sink(tmp_path / "direct", direct=True)
    assert d.direct == takes_o_direct(tmp_path)
    _run(d, src, steps)
    assert (tmp_path / "cached").read_bytes() == expect == (tmp_path / "direct").read_bytes()


def test_refused_at_open_goes_through_the_page_cache(tmp_path, monkeypatch):
    """A filesystem without O_DIRECT (open fails with EINVAL, as on older tmpfs)."""
    real = os.open

    def no_direct(path, flags, *a):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(path, flags, *a)

    monkeypatch.setattr(sink.os, "open", no_direct)
    s = open_sink(tmp_path / "f", direct=True)
    assert type(s) is Sink and not s.direct
    s.write(memoryview(b"abc"))
    s.close()
    assert (tmp_path / "f").read_bytes() == b"abc"


def test_refused_at_first_write_carries_on_from_the_same_offset(tmp_path, monkeypatch):
    """Accepted at open, refused at write (EINVAL on an O_DIRECT fd, as some FUSE/network mounts do)."""
    if not takes_o_direct(tmp_path):
        pytest.skip("this filesystem refuses O_DIRECT at open: the other fallback test covers it")
    monkeypatch.setattr(sink, "_STAGING", 2 * 4096)
    real = os.write

    def refuse_direct(fd, data):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data)

    monkeypatch.setattr(sink.os, "write", refuse_direct)
    src, steps, expect = _script(tmp_path, 7)
    s = open_sink(tmp_path / "f", direct=True)
    assert isinstance(s, DirectSink)
    _run(s, src, steps)
    assert not s.direct and (tmp_path / "f").read_bytes() == expect


def test_refused_after_some_direct_writes_goes_on_without_repeating_bytes(tmp_path, monkeypatch):
    """A refusal in the middle of a flush (after part of it went out direct) continues at the file's offset."""
    if not takes_o_direct(tmp_path):
        pytest.skip("this filesystem refuses O_DIRECT at open: the other fallback test covers it")
    monkeypatch.setattr(sink, "_STAGING", 4 * 4096)
    real, calls = os.write, {"n": 0}

    def short_then_refuse(fd, data):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            calls["n"] += 1
            if calls["n"] == 3:
                raise OSError(errno.EINVAL, "Invalid argument")
            return real(fd, memoryview(data)[:4096])  # short direct writes: one block per call
        return real(fd, data)

    monkeypatch.setattr(sink.os, "write", short_then_refuse)
    src, steps, expect = _script(tmp_path, 11)
    s = open_sink(tmp_path / "f", direct=True)
    _run(s, src, steps)
    assert calls["n"] >= 3 and not s.direct and (tmp_path / "f").read_bytes() == expect


def test_other_write_errors_are_not_swallowed(tmp_path, monkeypatch):
    if not takes_o_direct(tmp_path):
        pytest.skip("this filesystem refuses O_DIRECT")
    monkeypatch.setattr(sink, "_STAGING", 4096)

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    s = open_sink(tmp_path / "f", direct=True)
    monkeypatch.setattr(sink.os, "write", full)
    with pytest.raises(OSError) as e:
        s.write(memoryview(bytes(5000)))
    assert e.value.errno == errno.ENOSPC
    monkeypatch.undo()
    os.close(s.fd)


def test_merge_past_the_page_cache_writes_the_same_model(tmp_path):
    """``merge`` (default --direct-io) and ``--page-cache`` give the same files; the report says which ran."""
    from qvl_plugin.ckpt.merge import merge
    from tests.factories import ADAPTER_VARIANTS, build_model, make_adapter, save_base

    model = build_model("qwen2-vl")
    base = save_base(model, tmp_path / "base")
    _, adapter = make_adapter(model, ADAPTER_VARIANTS["qv"]("qwen2-vl"), tmp_path / "adapter")
    direct = merge(adapter, base, tmp_path / "direct", device="cpu")
    cached = merge(adapter, base, tmp_path / "cached", device="cpu", direct_io=False)
    assert direct.direct_io == takes_o_direct(tmp_path) and not cached.direct_io
    files = lambda d: {f.name: f.read_bytes() for f in sorted(d.iterdir())}
    assert files(tmp_path / "direct") == files(tmp_path / "cached")
    assert json.loads((tmp_path / "direct" / "config.json").read_text()) == json.loads((tmp_path / "cached" / "config.json").read_text())
