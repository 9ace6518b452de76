"""`merge --checksum` writes SHA256SUMS; `audit` verifies it."""

from __future__ import annotations

from qvl_plugin.ckpt.audit import audit
from qvl_plugin.ckpt.checksums import CHECKSUM_NAME, verify_manifest, write_manifest


def test_manifest_round_trip_and_audit_catches_a_flipped_byte(qwen2_vl_base, tmp_path):
    import shutil

    _, base = qwen2_vl_base
    out = tmp_path / "model"
    shutil.copytree(base, out)
    write_manifest(out)
    assert verify_manifest(out) == []
    assert "checksum-mismatch" not in {f.code for f in audit(out)}
    weights = out / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert verify_manifest(out) == ["model.safetensors"]
    found = [f for f in audit(out) if f.code == "checksum-mismatch"]
    assert found and found[0].severity == "error" and found[0].keys == ("model.safetensors",)
    assert verify_manifest(tmp_path) is None and (out / CHECKSUM_NAME).is_file()
