"""The streaming sharded writer: plan like huggingface_hub, bytes like safetensors, atomic like rename."""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from qvl_plugin.ckpt.checksums import CHECKSUM_NAME
from qvl_plugin.ckpt.outputs import check_output, is_weight_file, support_files
from qvl_plugin.ckpt.shards import TensorSpec, parse_size, plan_shards
from qvl_plugin.ckpt.writer import CheckpointWriter
from qvl_plugin.errors import WriteError
from qvl_plugin.errors import UsageError


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(40, 30, generator=g).to(torch.bfloat16),
        "b.bias": torch.randn(3, generator=g).to(torch.bfloat16),  # odd byte count before fp32 data
        "c.weight": torch.randn(50, 20, generator=g),
        "d.weight": torch.randn(70, 30, generator=g).to(torch.bfloat16),
        "e.scalar": torch.tensor(2.5),
        "f.ids": torch.arange(7, dtype=torch.int64),
        "g.weight": torch.randn(10, 10, generator=g).half(),
    }


def _specs(sd):
    return [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in sd.items()]


def _write(out, sd, max_shard_size="5GB", **kw):
    plan = plan_shards(_specs(sd), max_shard_size)
    with CheckpointWriter(out, plan, **kw) as w:
        for spec in plan.order:
            w.write(spec.name, sd[spec.name])
        w.commit()
    return plan


def _read_dir(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("limit", ["1KB", "3KB", "5KB", "100MB"])
def test_plan_matches_huggingface_hub_split(limit):
    sd = _tensors()
    ours = plan_shards(_specs(sd), limit)
    theirs = split_torch_state_dict_into_shards(sd, max_shard_size=limit)
    assert {f: sorted(s.name for s in specs) for f, specs in ours.shards} == {f: sorted(t) for f, t in theirs.filename_to_tensors.items()}
    assert ours.total_size == theirs.metadata["total_size"]
    assert ours.sharded == theirs.is_sharded


def test_sharded_round_trip_index_and_alignment(tmp_path):
    sd = _tensors()
    plan = _write(tmp_path / "out", sd, "3KB")
    out = tmp_path / "out"
    assert plan.sharded
    names = sorted(p.name for p in out.iterdir())
    n = len(plan.shards)
    assert names == sorted([f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)] + ["model.safetensors.index.json"])
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"] == {"total_parameters": sum(v.numel() for v in sd.values()), "total_size": sum(v.nbytes for v in sd.values())}
    assert set(index["weight_map"]) == set(sd)
    back = _read_dir(out)
    assert set(back) == set(sd) and all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in sd.items())
    for f in out.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            assert h.metadata() == {"format": "pt"}
        raw = f.read_bytes()
        n_header = int.from_bytes(raw[:8], "little")
        assert n_header % 8 == 0
        header = json.loads(raw[8:8 + n_header])
        for k, info in header.items():
            if k != "__metadata__":
                assert info["data_offsets"][0] % torch.empty(0, dtype=sd[k].dtype).element_size() == 0, k


def test_single_file_when_it_fits_and_rows_and_copy_range(tmp_path):
    sd = _tensors()
    src = tmp_path / "src.safetensors"
    save_file(sd, str(src))
    with open(src, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    plan = plan_shards(_specs(sd), "5GB")
    assert [f for f, _ in plan.shards] == ["model.safetensors"] and plan.index() is None
    with CheckpointWriter(tmp_path / "out", plan) as w:
        for spec in plan.order:
            if spec.name == "d.weight":
                w.write_rows(spec.name, [sd[spec.name][i:i + 16] for i in range(0, 70, 16)])
            elif spec.name in ("a.weight", "f.ids"):
                start, end = header[spec.name]["data_offsets"]
                w.copy_range(spec.name, src, 8 + n + start, end - start)
            else:
                w.write(spec.name, sd[spec.name])
        assert w.pending == []
        w.commit()
    assert sorted(os.listdir(tmp_path / "out")) == ["model.safetensors"]
    back = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert all(torch.equal(back[k], v) for k, v in sd.items())


def test_refusals_and_force_replaces(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    adapter = tmp_path / "dump.pth"
    adapter.write_bytes(b"x")
    with pytest.raises(UsageError, match="is the input"):
        check_output(base, [base])
    with pytest.raises(UsageError, match="inside the input"):
        check_output(base / "merged", [adapter, base])
    with pytest.raises(UsageError, match="contains the input"):
        check_output(tmp_path, [base], force=True)
    os.symlink(base, tmp_path / "alias")
    with pytest.raises(UsageError, match="inside the input"):
        check_output(tmp_path / "alias" / "x", [base])

    sd = {"w": torch.ones(2, 2)}
    out = tmp_path / "out"
    _write(out, sd)
    with pytest.raises(UsageError, match="already exists"):
        _write(out, {"w": torch.zeros(2, 2)})
    assert torch.equal(load_file(str(out / "model.safetensors"))["w"], torch.ones(2, 2))
    (out / "stale.txt").write_text("old")
    _write(out, {"w": torch.zeros(2, 2)}, force=True)
    assert sorted(os.listdir(out)) == ["model.safetensors"]
    assert torch.equal(load_file(str(out / "model.safetensors"))["w"], torch.zeros(2, 2))
    assert [p.name for p in tmp_path.iterdir() if ".qvl-tmp-" in p.name] == []


def _leftovers(tmp_path):
    return [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_error_midway_and_enospc_leave_nothing(tmp_path, monkeypatch):
    sd = _tensors()
    plan = plan_shards(_specs(sd), "2KB")
    with pytest.raises(KeyError):
        with CheckpointWriter(tmp_path / "out", plan) as w:
            for spec in plan.order:
                w.write(spec.name, sd[spec.name] if spec.name != "f.ids" else sd["missing"])
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []

    real_write = CheckpointWriter._emit
    calls = {"n": 0}

    def full_disk(self, data, count=True):
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data, count)

    monkeypatch.setattr(CheckpointWriter, "_emit", full_disk)
    with pytest.raises(WriteError, match="no space left on device"):
        _write(tmp_path / "out", sd, "2KB")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_verification_catches_a_damaged_shard_and_missing_tensors(tmp_path):
    sd = _tensors()
    plan = plan_shards(_specs(sd), "3KB")
    with pytest.raises(WriteError, match="verification"):
        with CheckpointWriter(tmp_path / "out", plan) as w:
            for spec in plan.order:
                w.write(spec.name, sd[spec.name])
            first = w.tmp / plan.shards[0][0]
            with open(first, "ab") as f:
                f.write(b"\0" * 8)  # bytes the header does not account for
            w.commit()
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []

    with pytest.raises(WriteError, match="never written"):
        with CheckpointWriter(tmp_path / "out", plan) as w:
            w.write(plan.order[0].name, sd[plan.order[0].name])
            w.commit()
    with pytest.raises(RuntimeError, match="out of order"):
        with CheckpointWriter(tmp_path / "out", plan) as w:
            w.write(plan.order[1].name, sd[plan.order[1].name])
    with pytest.raises(RuntimeError, match="shape"):
        with CheckpointWriter(tmp_path / "out", plan) as w:
            w.write(plan.order[0].name, torch.zeros(1, dtype=plan.order[0].dtype))
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_stale_temp_of_a_dead_run_is_cleared_and_checksums(tmp_path):
    stale = tmp_path / ".out.qvl-tmp-999999999-abc"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    _write(tmp_path / "out", {"w": torch.ones(3)}, checksum=True)
    assert not stale.exists()
    sums = (tmp_path / "out" / CHECKSUM_NAME).read_text().split()
    import hashlib

    assert sums == [hashlib.sha256((tmp_path / "out" / "model.safetensors").read_bytes()).hexdigest(), "model.safetensors"]


def test_support_files_and_sizes(tmp_path):
    d = tmp_path / "base"
    d.mkdir()
    for name in ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                 "preprocessor_config.json", "chat_template.jinja", "modeling_qwen.py", "qwen.tiktoken", "README.md",
                 "model.safetensors", "model-00001-of-00002.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "adapter_config.json", ".gitattributes"]:
        (d / name).write_text("x")
    (d / "original").mkdir()
    files, skipped = support_files(d)
    assert [p.name for p in files] == sorted(["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                                              "vocab.json", "merges.txt", "preprocessor_config.json", "chat_template.jinja",
                                              "modeling_qwen.py", "qwen.tiktoken", "README.md"])
    assert skipped == ["original/"]
    assert is_weight_file("pytorch_model-00001-of-00002.bin") and not is_weight_file("tokenizer.model")
    assert parse_size("5GB") == 5 * 10**9 and parse_size("1.5MB") == 1_500_000 and parse_size("2GiB") == 2 * 2**30 and parse_size(123) == 123
    for bad in ("5XB", "", "-1GB", "0"):
        with pytest.raises(UsageError):
            parse_size(bad)
