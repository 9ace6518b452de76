"""Hostile-input builders and hypothesis strategies, shared by the hardening tests and ``tools/fuzz_readers.py``.

Every generated input is a file or directory on disk; ``check_reader`` opens it the way every command does
(``open_checkpoint`` + ``summarize`` + loading each small tensor) and classifies the outcome. The contract:
a clean result or a ``QvlError`` -- never another exception type, never a hang.
"""

from __future__ import annotations

import contextlib
import json
import signal
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from hypothesis import strategies as st

from qvl_plugin.ckpt.inspect import summarize
from qvl_plugin.ckpt.view import open_checkpoint
from qvl_plugin.errors import QvlError

__all__ = [
    "ST_DTYPES",
    "Hang",
    "time_limit",
    "st_bytes",
    "valid_st",
    "write_st",
    "check_reader",
    "safetensors_inputs",
    "adapter_config_inputs",
    "dump_inputs",
    "pth_bytes_inputs",
]

ST_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1, "BOOL": 1}


class Hang(Exception):
    """The reader took longer than the guard allows."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """SIGALRM guard (main thread only): a blocking read or runaway regex becomes ``Hang``."""

    def on_alarm(signum, frame):
        raise Hang(f"no result after {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# --- safetensors built by hand (so they can lie) -------------------------------------------------------

def st_bytes(header: dict | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    """A safetensors file: 8-byte little-endian header length, header JSON, data. ``length`` may lie."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode("utf-8")
    n = len(raw) if length is None else length
    return struct.pack("<Q", n % 2**64) + raw + data


def valid_st(specs: list[tuple[str, str, list[int]]]) -> tuple[dict, bytes]:
    """A correct header + zero data for ``[(key, dtype, shape)]``, tensors packed in order."""
    header, pos = {}, 0
    for key, dtype, shape in specs:
        n = ST_DTYPES[dtype]
        for s in shape:
            n *= s
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    return header, b"\0" * pos


def write_st(path: Path, header: dict | bytes, data: bytes = b"", length: int | None = None) -> Path:
    path.write_bytes(st_bytes(header, data, length))
    return path


# --- the contract ------------------------------------------------------------------------------------

def check_reader(path: Path, *, timeout: float = 5.0, load_limit: int = 1 << 20, **kw) -> str:
    """Open, summarize and load (small) tensors. Returns ``"ok"`` or ``"error"`` (a QvlError).

    Any other exception propagates (the test fails with it); so does ``Hang``.
    """
    try:
        with time_limit(timeout):
            with open_checkpoint(path, **kw) as ckpt:
                summarize(ckpt)
                for e in ckpt.entries:
                    if e.nbytes <= load_limit:
                        t = e.load()
                        assert tuple(t.shape) == e.shape and t.dtype == e.dtype, (e.key, t.shape, e.shape)
    except QvlError as err:
        msg = str(err)
        assert msg.strip(), "a QvlError must carry a message"
        return "error"
    return "ok"


# --- strategies --------------------------------------------------------------------------------------

MODULES = [
    "model.layers.0.self_attn.q_proj",
    "model.language_model.layers.1.mlp.down_proj",
    "visual.blocks.0.attn.qkv",
    "model.visual.merger.mlp.0",
    "transformer.h.0.attn.c_attn",
    "model.embed_tokens",
    "model.language_model.embed_tokens",
    "transformer.wte",
    "lm_head",
    "m",
    "",
]
SUFFIXES = [
    ".lora_A.weight", ".lora_B.weight", ".lora_A.default.weight", ".lora_B.default.weight", ".lora_B.bias",
    ".lora_embedding_A", ".lora_embedding_B", ".lora_embedding_A.default", ".lora_magnitude_vector",
    ".lora_magnitude_vector.default.weight", ".modules_to_save.default.weight", ".base_layer.weight",
    ".token_adapter.trainable_tokens_delta", ".trainable_tokens_delta.default", ".original_module.weight",
    ".trainable_tokens_original.default", ".weight", ".bias", ".x", "",
]
PREFIXES = ["", ".", "..", "base_model.model.", ".base_model.model.", "base_model.model.base_model.model."]


@st.composite
def keys(draw) -> str:
    if draw(st.integers(0, 4)) == 0:
        return draw(st.text(max_size=24))
    return draw(st.sampled_from(PREFIXES)) + draw(st.sampled_from(MODULES)) + draw(st.sampled_from(SUFFIXES))


shapes = st.lists(st.integers(0, 5), max_size=4)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.sampled_from([0, 1, -1, 2**63, 2**64, 2**63 - 1, 2**64 - 1])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def _deep(depth: int, kind: str) -> bytes:
    return ("[" * depth + "]" * depth).encode() if kind == "list" else ('{"a":' * depth + "1" + "}" * depth).encode()


@dataclass
class Built:
    """A generated input: where it is and the keyword arguments to open it with."""

    path: Path
    kwargs: dict
    note: str


ST_MUTATIONS = ("none", "field", "delete_field", "shift", "metadata", "length", "bytes", "truncate", "extend", "dupkey", "deep", "not_object")


@st.composite
def safetensors_inputs(draw) -> Callable[[Path], Built]:
    """A valid small file, then one mutation of the header bytes, a JSON field, the offsets or the length."""
    specs = draw(st.lists(st.tuples(keys(), st.sampled_from(sorted(ST_DTYPES)), shapes), min_size=1, max_size=4, unique_by=lambda s: s[0]))
    header, data = valid_st(specs)
    mutation = draw(st.sampled_from(ST_MUTATIONS))
    length = None
    raw: bytes | None = None
    names = list(header)
    if mutation == "field":
        k = draw(st.sampled_from(names))
        header[k][draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = draw(json_values)
    elif mutation == "delete_field":
        k = draw(st.sampled_from(names))
        del header[k][draw(st.sampled_from(["dtype", "shape", "data_offsets"]))]
    elif mutation == "shift":
        k = draw(st.sampled_from(names))
        i = draw(st.integers(0, 1))
        header[k]["data_offsets"][i] += draw(st.integers(-16, 16) | st.sampled_from([2**62, 2**64, -(2**63)]))
    elif mutation == "metadata":
        header["__metadata__"] = draw(json_values)
    elif mutation == "length":
        n = len(json.dumps(header).encode())
        length = draw(st.integers(-n, 2**64 - 1 - n).map(lambda d: n + d) | st.integers(n - 8, n + 8).filter(lambda x: x >= 0))
    elif mutation == "dupkey":
        k = draw(st.sampled_from(names))
        text = json.dumps(header)
        raw = (text[:-1] + ", " + json.dumps(k) + ": " + json.dumps(header[k]) + "}").encode()
    elif mutation == "deep":
        raw = _deep(draw(st.sampled_from([10, 1000, 100_000])), draw(st.sampled_from(["list", "obj"])))
    elif mutation == "not_object":
        raw = json.dumps(draw(json_values)).encode()
    blob = bytearray(st_bytes(raw if raw is not None else header, data, length))
    if mutation == "bytes":
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(blob) - 1))
            blob[i] = draw(st.integers(0, 255))
    elif mutation == "truncate":
        blob = blob[: draw(st.integers(0, len(blob) - 1))]
    elif mutation == "extend":
        blob += draw(st.binary(min_size=1, max_size=16))
    container = draw(st.sampled_from(["bare", "merged", "peft"]))
    alpha = draw(st.none() | st.sampled_from([8.0, 16.0]))

    def build(root: Path) -> Built:
        if container == "bare":
            p = root / "x.safetensors"
            p.write_bytes(bytes(blob))
            return Built(p, {"lora_alpha": alpha} if alpha else {}, mutation)
        d = root / container
        d.mkdir()
        if container == "merged":
            (d / "config.json").write_text("{}")
            (d / "model.safetensors").write_bytes(bytes(blob))
        else:
            (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
            (d / "adapter_model.safetensors").write_bytes(bytes(blob))
        return Built(d, {}, mutation)

    return build


ADAPTER_FIELDS = [
    "peft_type", "r", "lora_alpha", "target_modules", "modules_to_save", "trainable_token_indices", "token_indices",
    "rank_pattern", "alpha_pattern", "use_rslora", "use_dora", "bias", "lora_bias", "init_lora_weights",
    "base_model_name_or_path", "fan_in_fan_out", "layer_replication", "auto_mapping", "ensure_weight_tying",
]
_ADAPTER_TENSORS = {
    "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": (4, 8),
    "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": (8, 4),
    "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight": (2, 8),
    "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight": (8, 2),
    "base_model.model.lm_head.weight": (16, 8),
    "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta": (2, 8),
    "base_model.model.model.embed_tokens.lora_embedding_A": (4, 16),
    "base_model.model.model.embed_tokens.lora_embedding_B": (8, 4),
}
_pattern_keys = (
    st.sampled_from(["q_proj", "down_proj", "layers.0.self_attn.q_proj", ".*", "model.*q_proj", "(", "[", "*", "a{2"])
    | st.text(max_size=8)
    | st.text(alphabet="()[]{}*+?.|\\^$_aq0", max_size=6)
)


@st.composite
def adapter_config_inputs(draw) -> Callable[[Path], Built]:
    """A PEFT adapter dir (or a dump + ``--adapter-config``) whose config has random values for its fields."""
    cfg: Any = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "down_proj"]}
    for name in draw(st.lists(st.sampled_from(ADAPTER_FIELDS), max_size=4, unique=True)):
        choice = draw(st.integers(0, 3))
        if choice == 0:
            cfg.pop(name, None)
        elif name in ("rank_pattern", "alpha_pattern") and choice == 1:
            cfg[name] = draw(st.dictionaries(_pattern_keys, st.integers(1, 64) | st.integers(1, 64) | json_values, max_size=3))
        elif name in ("trainable_token_indices", "token_indices") and choice == 1:
            cfg[name] = draw(st.lists(st.integers(-2, 20), max_size=4) | st.dictionaries(st.sampled_from(["embed_tokens", "wte", "x"]), st.lists(st.integers(-2, 20), max_size=3)))
        else:
            cfg[name] = draw(json_values)
    text: str | bytes
    kind = draw(st.integers(0, 9))
    if kind == 0:
        text = json.dumps(draw(json_values))  # not an object at all
    elif kind == 1:
        text = draw(st.binary(max_size=40))  # not JSON / not UTF-8
    else:
        text = json.dumps(cfg)
    names = draw(st.lists(st.sampled_from(sorted(_ADAPTER_TENSORS)), min_size=1, max_size=len(_ADAPTER_TENSORS), unique=True))
    header, data = valid_st([(n, "F32", list(_ADAPTER_TENSORS[n])) for n in names])
    as_dump = draw(st.booleans())

    def build(root: Path) -> Built:
        cfg_path = root / "adapter_config.json"
        cfg_path.write_bytes(text if isinstance(text, bytes) else text.encode())
        if as_dump:
            p = root / "dump.pth"
            torch.save({n: torch.zeros(_ADAPTER_TENSORS[n]) for n in names}, p)
            return Built(p, {"adapter_config": cfg_path}, "dump+config")
        write_st(root / "adapter_model.safetensors", header, data)
        return Built(root, {}, "peft")

    return build


_TORCH_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int8, torch.uint8, torch.bool, torch.complex64]
non_tensors = st.none() | st.integers() | st.text(max_size=8) | st.lists(st.integers(), max_size=3) | st.dictionaries(st.text(max_size=4), st.integers(), max_size=2)


@st.composite
def dump_inputs(draw) -> Callable[[Path], Built]:
    """A ``torch.save`` dict: odd keys (leading dots, bare ``.lora_A.x.weight``), odd shapes/dtypes, non-tensors."""
    entries: dict[Any, Any] = {}
    for _ in range(draw(st.integers(0, 6))):
        k = draw(keys() | st.integers() | st.tuples(st.integers()))
        if draw(st.integers(0, 5)) == 0:
            entries[k] = draw(non_tensors)
        else:
            shape = draw(shapes)
            dtype = draw(st.sampled_from(_TORCH_DTYPES))
            entries[k] = torch.zeros(shape, dtype=dtype)
            if isinstance(k, str) and draw(st.booleans()):
                entries["." + k] = entries[k]  # the manual dump's root-module duplicate (same storage)
            if isinstance(k, str) and draw(st.integers(0, 5)) == 0:
                entries["." + k] = torch.ones(shape, dtype=dtype)  # a "duplicate" with other values
    wrapper = draw(st.sampled_from([None, None, None, "state_dict", "model", "list"]))
    obj: Any = entries if wrapper is None else ([entries] if wrapper == "list" else {wrapper: entries})
    kw = draw(st.sampled_from([{}, {"lora_alpha": 16.0}, {"lora_alpha": 0.0}, {"format": "pth"}]))
    suffix = draw(st.sampled_from([".pth", ".bin", ".pt"]))

    def build(root: Path) -> Built:
        p = root / f"dump{suffix}"
        torch.save(obj, p)
        return Built(p, dict(kw), "dump")

    return build


PTH_MUTATIONS = ("pickle_flip", "pickle_truncate", "pickle_insert", "pickle_splice", "drop_storage", "short_storage", "long_storage", "file_flip")


@st.composite
def pth_bytes_inputs(draw) -> Callable[[Path], Built]:
    """A valid ``torch.save`` zip whose pickle stream or storage records are then damaged.

    Exercises the weights-only unpickler and torch's zip reader with allowed-but-lying opcodes (sizes,
    strides and offsets that do not fit the storage), missing or short storage records, and raw byte damage.
    """
    import io
    import zipfile

    n = draw(st.integers(1, 3))
    sd = {f"base_model.model.m{i}.lora_A.weight": torch.arange(draw(st.integers(1, 12)), dtype=torch.float32) for i in range(n)}
    buf = io.BytesIO()
    torch.save(sd, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    members = {i.filename: src.read(i.filename) for i in src.infolist()}
    pkl = next(k for k in members if k.endswith("data.pkl"))
    storages = sorted(k for k in members if "/data/" in k and not k.endswith("serialization_id"))
    mutation = draw(st.sampled_from(PTH_MUTATIONS))
    data = bytearray(members[pkl])
    if mutation == "pickle_flip":
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    elif mutation == "pickle_truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif mutation == "pickle_insert":
        i = draw(st.integers(0, len(data)))
        data[i:i] = draw(st.binary(min_size=1, max_size=8))
    elif mutation == "pickle_splice":  # integers in the stream (sizes, offsets) replaced by other integers
        i = draw(st.integers(0, len(data) - 1))
        data[i : i + 5] = b"J" + draw(st.integers(-(2**31), 2**31 - 1)).to_bytes(4, "little", signed=True)
    members[pkl] = bytes(data)
    if mutation == "drop_storage":
        members.pop(draw(st.sampled_from(storages)))
    elif mutation == "short_storage":
        k = draw(st.sampled_from(storages))
        members[k] = members[k][: draw(st.integers(0, max(0, len(members[k]) - 1)))]
    elif mutation == "long_storage":
        k = draw(st.sampled_from(storages))
        members[k] += draw(st.binary(min_size=1, max_size=16))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for k, v in members.items():
            z.writestr(k, v)
    blob = bytearray(out.getvalue())
    if mutation == "file_flip":
        for _ in range(draw(st.integers(1, 8))):
            blob[draw(st.integers(0, len(blob) - 1))] = draw(st.integers(0, 255))
    kw = draw(st.sampled_from([{}, {"lora_alpha": 8.0}]))

    def build(root: Path) -> Built:
        p = root / "dump.pth"
        p.write_bytes(bytes(blob))
        return Built(p, dict(kw), mutation)

    return build


# --- adapters aimed at a real base, for merge ---------------------------------------------------------

_MERGE_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64}


@st.composite
def merge_inputs(draw, base_entries: list[tuple[str, tuple[int, ...], torch.dtype]]) -> Callable[[Path], Built]:
    """A PEFT adapter (or dump) for ``base_entries`` ((on-disk key, shape, dtype) of a real base): mostly
    plausible LoRA/modules_to_save tensors, each possibly damaged (shape, rank 0, dims, dtype, NaN/Inf,
    empty), with a config whose alpha/rank/flags may be odd. Merged with a random output dtype."""
    linears = [(k, s) for k, s, _ in base_entries if k.endswith(".weight") and len(s) == 2]
    others = [(k, s) for k, s, _ in base_entries if len(s) >= 1]
    sd: dict[str, torch.Tensor] = {}
    r = draw(st.integers(1, 4))
    for key, (out_f, in_f) in draw(st.lists(st.sampled_from(linears), min_size=1, max_size=4, unique=True)):
        module = key[: -len(".weight")]
        a, b = torch.randn(r, in_f) * 0.01, torch.randn(out_f, r) * 0.01
        sd[f"base_model.model.{module}.lora_A.weight"] = a
        sd[f"base_model.model.{module}.lora_B.weight"] = b
        if draw(st.integers(0, 6)) == 0:
            sd[f"base_model.model.{module}.lora_magnitude_vector"] = torch.ones(out_f)
    for key, shape in draw(st.lists(st.sampled_from(others), max_size=2, unique=True)):
        sd[f"base_model.model.{key}"] = torch.zeros(shape)  # a modules_to_save / full replacement
    # damage
    for name in draw(st.lists(st.sampled_from(sorted(sd)), max_size=2, unique=True)):
        t = sd[name]
        how = draw(st.sampled_from(["shape+1", "transpose", "rank0", "0d", "1d", "dtype", "nan", "inf", "empty", "huge"]))
        if how == "shape+1" and t.dim():
            sd[name] = torch.zeros(t.shape[0] + 1, *t.shape[1:])
        elif how == "transpose" and t.dim() == 2:
            sd[name] = t.t().contiguous()
        elif how == "rank0" and t.dim() == 2:
            sd[name] = torch.zeros(0, t.shape[1]) if "lora_A" in name else torch.zeros(t.shape[0], 0)
        elif how == "0d":
            sd[name] = torch.tensor(1.0)
        elif how == "1d":
            sd[name] = t.reshape(-1)
        elif how == "dtype":
            sd[name] = t.to(draw(st.sampled_from(list(_MERGE_DTYPES.values()))))
        elif how == "nan":
            sd[name] = t.clone().fill_(float("nan"))
        elif how == "inf":
            sd[name] = t.clone().fill_(float("inf"))
        elif how == "empty":
            sd[name] = torch.zeros(0)
        elif how == "huge":
            sd[name] = t.clone().fill_(3e38)
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": draw(st.sampled_from([8, 1, 0, -4, 1e30, 16.5])),
           "use_rslora": draw(st.booleans()), "use_dora": any("magnitude" in k for k in sd)}
    as_dump = draw(st.integers(0, 3)) == 0
    dtype = draw(st.sampled_from(["auto", "bf16", "fp16", "fp32"]))

    def build(root: Path) -> Built:
        if as_dump:
            p = root / "dump.pth"
            torch.save({k.replace("base_model.model.", "base_model.model.", 1): v for k, v in sd.items()}, p)
            return Built(p, {"lora_alpha": float(cfg["lora_alpha"]), "dtype": dtype}, "dump")
        d = root / "adapter"
        d.mkdir()
        (d / "adapter_config.json").write_text(json.dumps(cfg))
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "adapter_model.safetensors"))
        return Built(d, {"dtype": dtype}, "peft")

    return build
