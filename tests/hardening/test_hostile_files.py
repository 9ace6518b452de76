"""Hostile files: pickles with code, safetensors headers that lie, shard paths that escape, bad configs.

Each case is checked twice: the library raises a QvlError subclass (not some other exception the CLI's
generic catch would hide), and the CLI exits 1 with one ``error:`` line and no traceback.
"""

from __future__ import annotations

import builtins
import json
import os
import pickle
import subprocess
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from qvl_plugin.ckpt.adapter_config import AdapterSettings, load_adapter_config
from qvl_plugin.ckpt.inspect import summarize
from qvl_plugin.ckpt.view import open_checkpoint
from qvl_plugin.errors import AdapterConfigError, CheckpointError, QvlError, UnsafeCheckpointError


try:
    from .hardening_util import assert_one_line_error, assert_script_one_line_error, cli, run_script
    from .fuzzlib import time_limit, valid_st, write_st
except ImportError:  # tests/hardening is not a package
    from hardening_util import assert_one_line_error, assert_script_one_line_error, cli, run_script
    from fuzzlib import time_limit, valid_st, write_st


def _open(path, **kw):
    with open_checkpoint(path, **kw) as ckpt:
        return summarize(ckpt)


# --- pickles with a code payload ---------------------------------------------------------------------

class _Payload:
    """An object whose unpickling calls ``fn(*args)``: what a hostile dump carries."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


PAYLOADS = {
    "os.system": lambda marker: _Payload(os.system, f"touch {marker}"),
    "builtins.exec": lambda marker: _Payload(builtins.exec, f"open({str(marker)!r}, 'w').close()"),
    "builtins.eval": lambda marker: _Payload(builtins.eval, f"__import__('pathlib').Path({str(marker)!r}).touch()"),
    "subprocess.Popen": lambda marker: _Payload(subprocess.Popen, ["touch", str(marker)]),
}


def _evil(path: Path, marker: Path, payload: str = "os.system", legacy: bool = False) -> Path:
    """A dump whose unpickling would run code; the tensors around it look perfectly normal."""
    obj = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 8),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(8, 2),
        "zz_payload": PAYLOADS[payload](marker),
    }
    if legacy:
        with open(path, "wb") as f:
            pickle.dump(obj, f)
    else:
        torch.save(obj, path)
    assert not marker.exists()
    return path


@pytest.mark.parametrize("payload", sorted(PAYLOADS))
@pytest.mark.parametrize("suffix", [".pth", ".bin"])
def test_pickle_payload_never_runs_library(tmp_path, payload, suffix):
    marker = tmp_path / "MARKER"
    evil = _evil(tmp_path / f"evil{suffix}", marker, payload)
    with pytest.raises(UnsafeCheckpointError, match="refused"):
        _open(evil, lora_alpha=8)
    assert not marker.exists()


def test_legacy_pickle_payload_never_runs(tmp_path):
    marker = tmp_path / "MARKER"
    evil = _evil(tmp_path / "legacy.pth", marker, legacy=True)
    with pytest.raises(CheckpointError):
        _open(evil)
    assert not marker.exists()


def test_pickle_payload_in_peft_and_model_dirs(tmp_path):
    marker = tmp_path / "MARKER"
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    _evil(adapter / "adapter_model.bin", marker)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    _evil(model / "pytorch_model.bin", marker, "builtins.exec")
    for path in (adapter, model):
        with pytest.raises(UnsafeCheckpointError):
            _open(path)
        assert_one_line_error(cli("inspect", path), "refused")
    assert not marker.exists()


def _tiny_base(path: Path) -> Path:
    """A minimal merged model: enough for a command to get as far as opening its other input."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "qwen2_vl", "architectures": ["Qwen2VLForConditionalGeneration"]}))
    save_file({"model.layers.0.self_attn.q_proj.weight": torch.zeros(8, 8)}, str(path / "model.safetensors"))
    return path


def test_pickle_payload_cli_inspect_audit_merge(tmp_path):
    marker = tmp_path / "MARKER"
    evil = _evil(tmp_path / "evil.pth", marker)
    assert_one_line_error(cli("inspect", evil, "--lora-alpha", 8), "refused")
    assert_one_line_error(cli("inspect", evil, "--json"), "refused")
    # audit reports an unreadable input as a finding (exit 1), not as an error line
    res = cli("audit", evil, "--json")
    assert res.exit_code == 1 and isinstance(res.exception, (SystemExit, type(None))), res.output
    assert "Traceback" not in res.output
    found = json.loads(res.stdout)["findings"]
    assert [f["code"] for f in found] == ["unreadable"] and "refused" in found[0]["message"]
    base = _tiny_base(tmp_path / "base")
    out = tmp_path / "out"
    assert_one_line_error(cli("merge", evil, "--base", base, "-o", out, "--lora-alpha", 8), "refused")
    assert not out.exists()
    # the payload as the BASE's weights
    evil_base = tmp_path / "evil_base"
    evil_base.mkdir()
    (evil_base / "config.json").write_text("{}")
    _evil(evil_base / "pytorch_model.bin", marker, "builtins.exec")
    good = tmp_path / "good.pth"
    torch.save({"model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 8)}, good)
    assert_one_line_error(cli("merge", good, "--base", evil_base, "-o", out, "--lora-alpha", 8))
    assert not out.exists()
    assert_one_line_error(cli("convert", evil, "--to", "peft", "-o", tmp_path / "conv", "--lora-alpha", 8), "refused")
    assert not (tmp_path / "conv").exists()
    assert not marker.exists()


def test_pickle_payload_through_console_script(tmp_path):
    """The real entry point, in a fresh process, with the marker relative to its working directory."""
    marker = tmp_path / "MARKER"
    evil = _evil(tmp_path / "evil.bin", marker)
    proc = run_script("inspect", evil, "--json", "--lora-alpha", "8", cwd=tmp_path)
    assert_script_one_line_error(proc, "refused")
    assert not marker.exists() and not (tmp_path / "MARKER").exists()


# --- safetensors headers that lie --------------------------------------------------------------------

GOOD = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F16", "shape": [2, 2], "data_offsets": [8, 16]}}
LIES = {
    "overlapping offsets": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, 12, None),
    "offsets past the end": ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, 8, None),
    "gap before a tensor": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, 8, None),
    "gap between tensors": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}, 12, None),
    "trailing bytes": (GOOD, 20, None),
    "reversed offsets": ({"a": {"dtype": "F32", "shape": [0], "data_offsets": [8, 0]}}, 8, None),
    "huge header length": (GOOD, 16, 2**63),
    "header length 2^64-1": (GOOD, 16, 2**64 - 1),
    "header length past file": (GOOD, 16, 10_000),
    "header length over 100 MB": (GOOD, 16, 100 * 1024 * 1024 + 1),
    "shape x dtype != bytes": ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, 8, None),
    "dtype smaller than bytes": ({"a": {"dtype": "F16", "shape": [2], "data_offsets": [0, 8]}}, 8, None),
    "overflowing shape": ({"a": {"dtype": "F32", "shape": [2**62, 2**62, 4], "data_offsets": [0, 8]}}, 8, None),
    "shape beyond int64": ({"a": {"dtype": "F32", "shape": [0, 2**64], "data_offsets": [0, 0]}}, 0, None),
    "negative shape": ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, 8, None),
    "two negative dims": ({"a": {"dtype": "F32", "shape": [-1, -2], "data_offsets": [0, 8]}}, 8, None),
    "float shape": ({"a": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, 8, None),
    "fractional offsets": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0.0, 8.9]}}, 8, None),
    "string shape": ({"a": {"dtype": "F32", "shape": ["2"], "data_offsets": [0, 8]}}, 8, None),
    "bool shape": ({"a": {"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}}, 8, None),
    "shape not a list": ({"a": {"dtype": "F32", "shape": 2, "data_offsets": [0, 8]}}, 8, None),
    "three offsets": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 8]}}, 8, None),
    "unknown dtype": ({"a": {"dtype": "Q4_K", "shape": [2], "data_offsets": [0, 8]}}, 8, None),
    "dtype not a string": ({"a": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}}, 8, None),
    "missing field": ({"a": {"dtype": "F32", "shape": [2]}}, 8, None),
    "entry not an object": ({"a": [1, 2]}, 8, None),
    "bad __metadata__": ({"__metadata__": {"format": 1}, **GOOD}, 16, None),
    "header not an object": ([1, 2, 3], 0, None),
}
RAW_LIES = {
    "duplicate keys": b'{"a": {"dtype":"F32","shape":[2],"data_offsets":[0,8]}, "a": {"dtype":"F32","shape":[2],"data_offsets":[0,8]}}',
    "non-UTF-8 header": b'{"\xff\xfe": {"dtype":"F32","shape":[2],"data_offsets":[0,8]}}',
    "UTF-8 BOM": b'\xef\xbb\xbf{"a": {"dtype":"F32","shape":[2],"data_offsets":[0,8]}}',
    "NaN in shape": b'{"a": {"dtype":"F32","shape":[NaN],"data_offsets":[0,8]}}',
    "Infinity in shape": b'{"a": {"dtype":"F32","shape":[Infinity],"data_offsets":[0,8]}}',
    "5000-digit integer": b'{"a": {"dtype":"F32","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,8]}}',
    "deeply nested list": b"[" * 100_000 + b"]" * 100_000,
    "deeply nested object": b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    "not JSON": b"\x00" * 32,
    "empty header": b"",
}


def _lying_files(tmp_path: Path) -> dict[str, Path]:
    files = {}
    for i, (name, (header, data_len, length)) in enumerate(LIES.items()):
        files[name] = write_st(tmp_path / f"lie{i}.safetensors", header, b"\0" * data_len, length)
    for i, (name, raw) in enumerate(RAW_LIES.items()):
        files[name] = write_st(tmp_path / f"raw{i}.safetensors", raw, b"\0" * 8)
    good = write_st(tmp_path / "good.safetensors", GOOD, b"\0" * 16)
    data = good.read_bytes()
    for cut in (0, 4, 8, 20, len(data) - 1):
        (tmp_path / f"trunc{cut}.safetensors").write_bytes(data[:cut])
        files[f"truncated at {cut}"] = tmp_path / f"trunc{cut}.safetensors"
    return files


def test_lying_headers_rejected_by_library(tmp_path):
    assert _open(write_st(tmp_path / "good.safetensors", GOOD, b"\0" * 16))["num_tensors"] == 2
    for name, path in _lying_files(tmp_path).items():
        with time_limit(5):
            try:
                _open(path)
            except UnsafeCheckpointError as e:
                assert "\n" not in str(e) and len(str(e)) < 400, (name, str(e))
            except Exception as e:  # noqa: BLE001 - the point is to name the case
                raise AssertionError(f"{name}: {type(e).__name__}: {e}") from e
            else:
                raise AssertionError(f"{name}: accepted")


def test_lying_headers_cli_one_line(tmp_path):
    for name, path in _lying_files(tmp_path).items():
        assert_one_line_error(cli("inspect", path, "--json"))


def test_lying_header_inside_model_and_adapter_dirs(tmp_path):
    header, data_len, length = LIES["overlapping offsets"]
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    write_st(model / "model.safetensors", header, b"\0" * data_len, length)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4}))
    write_st(adapter / "adapter_model.safetensors", RAW_LIES["duplicate keys"], b"\0" * 8)
    for path in (model, adapter):
        with pytest.raises(UnsafeCheckpointError):
            _open(path)
        assert_one_line_error(cli("inspect", path))


def test_valid_files_that_look_odd_are_accepted(tmp_path):
    """Zero-size tensors, empty metadata, a zero-dim scalar, and a file with no tensors at all."""
    header, data = valid_st([("a", "F32", [0, 4]), ("b", "BF16", []), ("c", "U8", [3])])
    header["__metadata__"] = {"format": "pt"}
    assert _open(write_st(tmp_path / "odd.safetensors", header, data))["num_tensors"] == 3


# --- shard paths that escape the model directory ----------------------------------------------------

def _sharded(tmp_path: Path, weight_map: dict) -> Path:
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text("{}")
    (model / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return model


@pytest.mark.parametrize(
    "case",
    ["dotdot", "absolute", "nested dotdot", "symlink out", "symlinked dir out", "symlink loop", "dot", "empty", "list", "number", "null", "nul byte"],
)
def test_index_weight_map_outside_directory_refused(tmp_path, case):
    secret = tmp_path / "outside.safetensors"
    save_file({"a": torch.zeros(2)}, str(secret))
    model = tmp_path / "model"
    model.mkdir()
    rel = {
        "dotdot": "../outside.safetensors",
        "absolute": str(secret),
        "nested dotdot": "sub/../../outside.safetensors",
        "symlink out": "link.safetensors",
        "symlinked dir out": "linkdir/outside.safetensors",
        "symlink loop": "loop.safetensors",
        "dot": ".",
        "empty": "",
        "list": ["model.safetensors"],
        "number": 3,
        "null": None,
        "nul byte": "a\x00.safetensors",
    }[case]
    (model / "link.safetensors").symlink_to(secret)
    (model / "linkdir").symlink_to(tmp_path)
    (model / "loop.safetensors").symlink_to(model / "loop.safetensors")
    model = _sharded(tmp_path, {"a": rel})
    with time_limit(5), pytest.raises(UnsafeCheckpointError, match="refused"):
        _open(model)
    assert_one_line_error(cli("inspect", model), "refused")


def test_index_inside_directory_and_hf_cache_snapshot_accepted(tmp_path):
    """Shards in a subfolder are fine, and so is the Hugging Face cache (snapshot symlinks into ../../blobs)."""
    model = tmp_path / "model"
    (model / "shards").mkdir(parents=True)
    save_file({"a": torch.zeros(2)}, str(model / "shards" / "s1.safetensors"))
    save_file({"b": torch.zeros(3)}, str(model / "s2.safetensors"))
    _sharded(tmp_path, {"a": "shards/s1.safetensors", "b": "./s2.safetensors"})
    assert _open(model)["num_tensors"] == 2

    repo = tmp_path / "hub" / "models--org--tiny"
    snap = repo / "snapshots" / "0123abc"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    save_file({"a": torch.zeros(2)}, str(repo / "blobs" / "sha1"))
    save_file({"b": torch.zeros(3)}, str(repo / "blobs" / "sha2"))
    (snap / "model-00001-of-00002.safetensors").symlink_to("../../blobs/sha1")
    (snap / "model-00002-of-00002.safetensors").symlink_to("../../blobs/sha2")
    (snap / "config.json").write_text("{}")
    (snap / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}})
    )
    assert _open(snap)["num_tensors"] == 2
    # ...but a snapshot may not name the blobs (or anything else) by a path of its own
    (snap / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../../blobs/sha1"}}))
    with pytest.raises(UnsafeCheckpointError):
        _open(snap)


# --- non-regular files: a FIFO or a device must not block or stream forever -------------------------

def test_fifo_and_device_files_refused_quickly(tmp_path):
    fifo = tmp_path / "weights.safetensors"
    os.mkfifo(fifo)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    os.mkfifo(model / "model-1.safetensors")
    pth_fifo = tmp_path / "dump.pth"
    os.mkfifo(pth_fifo)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    os.symlink("/dev/zero", adapter / "adapter_model.safetensors")
    cases = [(fifo, {}), (model, {}), (pth_fifo, {"format": "pth"}), (Path("/dev/zero"), {"format": "merged"}), (adapter, {})]
    for path, kw in cases:
        t0 = time.monotonic()
        with time_limit(5), pytest.raises(CheckpointError):
            _open(path, **kw)
        assert time.monotonic() - t0 < 2, path
    assert_one_line_error(cli("inspect", fifo))
    assert_one_line_error(cli("inspect", "--format", "merged", "/dev/zero"))


def test_huge_json_config_refused(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    with open(model / "config.json", "wb") as f:  # sparse: no real disk use
        f.truncate(200 * 1024 * 1024)
    save_file({"a": torch.zeros(2)}, str(model / "model.safetensors"))
    with pytest.raises(CheckpointError, match="too large"):
        _open(model)


# --- unsafe pth content that is not code -------------------------------------------------------------

@pytest.mark.parametrize("kind", ["sparse", "nested", "meta", "quantized"])
def test_non_dense_tensors_in_dump_refused(tmp_path, kind):
    make = {
        "sparse": lambda: torch.sparse_coo_tensor([[0]], [1.0], (3,)),
        "nested": lambda: torch.nested.nested_tensor([torch.zeros(2), torch.zeros(3)]),
        "meta": lambda: torch.empty(2, 2, device="meta"),
        "quantized": lambda: torch.quantize_per_tensor(torch.zeros(2), 0.1, 0, torch.qint8),
    }[kind]
    path = tmp_path / "odd.pth"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save({"m.lora_A.weight": make()}, path)
    with pytest.raises(CheckpointError, match=kind):
        _open(path, lora_alpha=8)
    assert_one_line_error(cli("inspect", path), kind)


def test_dump_with_conflicting_duplicate_and_hostile_storage(tmp_path):
    p = tmp_path / "dup.pth"
    torch.save({"x.weight": torch.zeros(2), ".x.weight": torch.ones(2)}, p)
    with pytest.raises(CheckpointError, match="different values"):
        _open(p)
    data = tmp_path / "trunc.pth"
    torch.save({"x.weight": torch.zeros(1000)}, tmp_path / "ok.pth")
    blob = (tmp_path / "ok.pth").read_bytes()
    for cut in (10, len(blob) // 2, len(blob) - 10):
        data.write_bytes(blob[:cut])
        with pytest.raises(CheckpointError):
            _open(data)


# --- adapter_config.json with wrong types or unknown peft types -------------------------------------

BAD_CONFIGS = {
    "r": ("8", "r"),
    "lora_alpha": ([], "lora_alpha"),
    "target_modules": (3, "target_modules"),
    "modules_to_save": ("x", "modules_to_save"),
    "trainable_token_indices": ({"a": "b"}, "trainable_token_indices"),
    "peft_type IA3": ("IA3", "peft_type"),
    "peft_type BOGUS": ("BOGUS", "peft_type"),
    "peft_type number": (5, "peft_type"),
    "r negative": (-4, "r"),
    "r bool": (True, "r"),
    "lora_alpha nan": (float("nan"), "lora_alpha"),
    "rank_pattern value": ({"q_proj": "8"}, "rank_pattern"),
    "alpha_pattern not a dict": ([1], "alpha_pattern"),
    "use_rslora string": ("yes", "use_rslora"),
    "bias unknown": ("some", "bias"),
    "init_lora_weights number": (3, "init_lora_weights"),
}


def _field(case: str) -> str:
    return {"peft_type IA3": "peft_type", "peft_type BOGUS": "peft_type", "peft_type number": "peft_type", "r negative": "r",
            "r bool": "r", "lora_alpha nan": "lora_alpha", "rank_pattern value": "rank_pattern", "alpha_pattern not a dict": "alpha_pattern",
            "use_rslora string": "use_rslora", "bias unknown": "bias", "init_lora_weights number": "init_lora_weights"}.get(case, case)


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_adapter_config_clear_error(tmp_path, case):
    value, word = BAD_CONFIGS[case]
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], _field(case): value}
    with pytest.raises(AdapterConfigError, match=word):
        AdapterSettings.from_dict(cfg)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    write_st(adapter / "adapter_model.safetensors", *valid_st([("base_model.model.m.q_proj.lora_A.weight", "F32", [2, 4])]))
    with pytest.raises(AdapterConfigError, match=word):
        _open(adapter)
    assert_one_line_error(cli("inspect", adapter), word)
    # the same config handed to a .pth dump
    dump = tmp_path / "d.pth"
    torch.save({"m.q_proj.lora_A.weight": torch.zeros(2, 4)}, dump)
    with pytest.raises(AdapterConfigError, match=word):
        _open(dump, adapter_config=adapter / "adapter_config.json")
    assert_one_line_error(cli("inspect", dump, "--adapter-config", adapter / "adapter_config.json"), word)


@pytest.mark.parametrize("text", [b"[1, 2]", b"not json", b"\xff\xfe\x00", b"[" * 100_000, b""])
def test_adapter_config_not_an_object(tmp_path, text):
    path = tmp_path / "adapter_config.json"
    path.write_bytes(text)
    with pytest.raises(QvlError):
        load_adapter_config(path)
    adapter = tmp_path
    write_st(adapter / "adapter_model.safetensors", *valid_st([("base_model.model.m.q_proj.lora_A.weight", "F32", [2, 4])]))
    with pytest.raises(QvlError):
        _open(adapter)
    assert_one_line_error(cli("inspect", adapter))


def test_console_script_stderr_is_one_line_for_odd_tensors(tmp_path):
    """torch warns while rebuilding deprecated tensor kinds; the user must still see exactly one line."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save({"a": torch.quantize_per_tensor(torch.zeros(2), 0.1, 0, torch.qint8)}, tmp_path / "q.pth")
    assert_script_one_line_error(run_script("inspect", tmp_path / "q.pth"), "quantized")
