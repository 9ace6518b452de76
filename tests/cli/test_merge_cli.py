"""qvl-ckpt merge / convert / extract: thin, one-line errors, exit codes 0 / 1 / 2."""

from __future__ import annotations

import json
import warnings

import pytest
from click.testing import CliRunner

from qvl_plugin.cli import main
from tests.factories import ADAPTER_VARIANTS, make_adapter, make_dump, small_merge_chunks


@pytest.fixture(scope="module")
def inputs(qwen2_vl_tied_base, tmp_path_factory):
    model, base = qwen2_vl_tied_base
    d = tmp_path_factory.mktemp("cli")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm, adapter = make_adapter(model, ADAPTER_VARIANTS["linear-embed-head"]("x"), d / "adapter")
    dump = make_dump(pm, d / "lora.pth")
    return base, adapter, dump


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_merge_human_and_json(inputs, tmp_path):
    base, adapter, dump = inputs
    r = _run("merge", dump, "--base", base, "-o", tmp_path / "out", "--lora-alpha", "8", "--max-shard-size", "200KB")
    assert r.exit_code == 0, r.output
    assert "14 LoRA" in r.output and "2 replaced" in r.output and "tie_word_embeddings" in r.output
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    r = _run("merge", adapter, "--base", base, "-o", tmp_path / "out2", "--json", "--dtype", "bf16", "--checksum")
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert report["untied"] is True and report["added"] == ["lm_head.weight"] and report["counts"]["lora"] == 14
    assert set(report["seconds"]) >= {"plan", "read", "math", "write", "copy", "commit", "total"}
    assert (tmp_path / "out2" / "SHA256SUMS").is_file()


def test_merge_errors_are_one_line_exit_1(inputs, tmp_path):
    base, adapter, dump = inputs
    r = _run("merge", dump, "--base", base, "-o", tmp_path / "out")
    assert r.exit_code == 1 and r.output.startswith("error: ") and "--lora-alpha" in r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    r = _run("merge", adapter, "--base", base, "-o", base / "inside")
    assert r.exit_code == 1 and "inside the input" in r.output
    r = _run("merge", adapter, "--base", base, "-o", tmp_path / "o", "--max-shard-size", "lots")
    assert r.exit_code == 1 and "invalid size" in r.output
    r = _run("merge", adapter, "--base", base, "-o", tmp_path / "o", "--dtype", "int8")
    assert r.exit_code == 2
    r = _run("merge", adapter, "-o", tmp_path / "o")
    assert r.exit_code == 2


def test_convert_both_ways(inputs, tmp_path):
    base, adapter, dump = inputs
    r = _run("convert", dump, "--to", "peft", "-o", tmp_path / "p", "--lora-alpha", "8", "--base", base)
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "p" / "adapter_config.json").read_text())["lora_alpha"] == 8
    r = _run("convert", adapter, "--to", "pth", "-o", tmp_path / "clean.pth", "--base", base)
    assert r.exit_code == 0, r.output
    assert "0 unexpected, 0 adapter keys missing" in " ".join(r.output.split())
    r = _run("convert", adapter, "--to", "pth", "-o", tmp_path / "c2.pth", "--base", base, "--json")
    assert json.loads(r.output)["load"] == {"unexpected": [], "missing_adapter": []}
    r = _run("convert", dump, "--to", "peft", "-o", tmp_path / "q")
    assert r.exit_code == 1 and r.output.startswith("error: ")


def test_extract(inputs, tmp_path):
    base, adapter, _ = inputs
    assert _run("merge", adapter, "--base", base, "-o", tmp_path / "m").exit_code == 0
    r = _run("extract", tmp_path / "m", "--base", base, "-o", tmp_path / "x", "--rank", "auto", "--energy", "0.9")
    assert r.exit_code == 0, r.output
    assert "max relative error" in " ".join(r.output.split())
    r = _run("extract", tmp_path / "m", "--base", base, "-o", tmp_path / "y", "--rank", "2", "--json")
    report = json.loads(r.output)
    assert {m["rank"] for m in report["modules"] if m["kind"] == "lora"} == {2}
    assert _run("extract", tmp_path / "m", "--base", base, "-o", tmp_path / "z", "--rank", "zero").exit_code == 2


def test_extract_scaling_options(inputs, tmp_path):
    base, adapter, _ = inputs
    assert _run("merge", adapter, "--base", base, "-o", tmp_path / "m").exit_code == 0
    r = _run("extract", tmp_path / "m", "--base", base, "-o", tmp_path / "x", "--rank", "auto", "--max-rank", "3", "--sv-epsilon", "1e-6",
             "--exclude", "embed|lm_head", "--svd", "lowrank", "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    lora = [m for m in report["modules"] if m["kind"] == "lora"]
    assert lora and all(m["rank"] <= 3 and m["svd"] == "lowrank" for m in lora) and report["device"] == "cpu"
    assert not [m for m in report["modules"] if m["kind"] == "full"] and set(report["seconds"]) == {"svd", "total"}
    r = _run("extract", tmp_path / "m", "--base", base, "-o", tmp_path / "y", "--include", "[")
    assert r.exit_code == 1 and r.output.startswith("error: ") and not (tmp_path / "y").exists()
    assert _run("extract", tmp_path / "m", "--base", base, "-o", tmp_path / "y", "--max-rank", "0").exit_code == 2


@pytest.mark.parametrize("writer", ["inline", "thread"])
def test_merge_write_failure_midway_through_a_streamed_tensor_is_one_line_and_no_output(inputs, tmp_path, monkeypatch, writer):
    """A write failing between row chunks ends the merge cleanly: one error line, no OUT, no temp dir -- also
    when the writes run on the writer thread (the error crosses to the computing thread; queued writes drop)."""
    monkeypatch.setenv("QVL_MERGE_WRITER", writer)
    from qvl_plugin.ckpt.writer import CheckpointWriter
    from qvl_plugin.errors import WriteError

    base, adapter, _ = inputs
    small_merge_chunks(monkeypatch)  # many chunks per tensor
    calls = {"n": 0}
    real = CheckpointWriter.write_chunk

    def failing(self, chunk):
        calls["n"] += 1
        if calls["n"] == 5:
            raise WriteError("disk full (simulated)")
        return real(self, chunk)

    monkeypatch.setattr(CheckpointWriter, "write_chunk", failing)
    r = _run("merge", adapter, "--base", base, "-o", tmp_path / "out", "--device", "cpu")
    assert r.exit_code == 1 and r.output.startswith("error: ") and "disk full" in r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir()]  # no temp dir left either
    r = _run("merge", adapter, "--base", base, "-o", tmp_path / "ok", "--json")
    s = json.loads(r.output)["seconds"]
    assert r.exit_code == 0 and {"read", "math", "write"} <= set(s) and json.loads(r.output)["writer_thread"] == (writer == "thread")


def test_writer_thread_and_inline_write_the_same_bytes(inputs, tmp_path, monkeypatch):
    """The writer thread (used from 4 cores up) changes when bytes are written, never which: small chunks,
    so the 3 rotating buffers are reused many times while the writer still works."""
    base, adapter, _ = inputs
    small_merge_chunks(monkeypatch)
    outs = {}
    for writer in ("inline", "thread"):
        monkeypatch.setenv("QVL_MERGE_WRITER", writer)
        outs[writer] = tmp_path / writer
        assert _run("merge", adapter, "--base", base, "-o", outs[writer], "--device", "cpu").exit_code == 0
    files = lambda d: {f.name: f.read_bytes() for f in sorted(d.iterdir())}
    assert files(outs["inline"]) == files(outs["thread"])


def test_dora_linear_streams_in_row_chunks_with_the_whole_merge_bits(inputs, tmp_path, monkeypatch):
    """DoRA on a Linear goes through the row-chunked path (per-row norms): the same bytes as one chunk."""
    from tests.factories import build_model

    base, _, _ = inputs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, dora = make_adapter(build_model("qwen2-vl", tied=True), ADAPTER_VARIANTS["dora"]("x"), tmp_path / "dora")
    assert _run("merge", dora, "--base", base, "-o", tmp_path / "whole", "--device", "cpu").exit_code == 0
    calls = small_merge_chunks(monkeypatch, counted="dora_rows")
    r = _run("merge", dora, "--base", base, "-o", tmp_path / "chunked", "--device", "cpu", "--json")
    assert r.exit_code == 0 and json.loads(r.output)["counts"]["dora"] > 0 and calls["n"] >= json.loads(r.output)["counts"]["dora"]
    files = lambda d: {f.name: f.read_bytes() for f in sorted(d.glob("*.safetensors"))}
    assert files(tmp_path / "whole") == files(tmp_path / "chunked")
