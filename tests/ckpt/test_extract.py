"""extract: merged - base as a PEFT adapter; merging it back lands within the reported error."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForImageTextToText

from qvl_plugin.ckpt.extract import choose_rank, extract, svd_factors
from qvl_plugin.ckpt.svd import truncated_svd as _svd
from qvl_plugin.ckpt.merge import merge
from qvl_plugin.errors import CheckpointError, UsageError
from tests.factories import ADAPTER_VARIANTS, build_model, logits, make_adapter


def _sd(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForImageTextToText.from_pretrained(path).state_dict()


@pytest.fixture(scope="module")
def merged_tied(qwen2_vl_tied_base, tmp_path_factory):
    """A tied base with LoRA on every language Linear + trained embed/head (the merge unties it)."""
    model, base = qwen2_vl_tied_base
    d = tmp_path_factory.mktemp("extract")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm, adapter = make_adapter(model, ADAPTER_VARIANTS["linear-embed-head"]("x"), d / "a")
    merge(adapter, base, d / "merged")
    return pm, base, d / "merged"


def test_exact_rank_round_trip(merged_tied, tmp_path):
    pm, base, merged = merged_tied
    report = extract(merged, base, tmp_path / "x", rank=4)
    kinds = {m.kind for m in report.modules}
    assert kinds == {"lora", "full"} and report.unchanged > 0
    assert {m.module for m in report.modules if m.kind == "full"} == {"lm_head", "model.language_model.embed_tokens"}
    assert sum(m.kind == "lora" for m in report.modules) == 14 and report.max_rel_error < 1e-5
    cfg = json.loads((tmp_path / "x" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 4 and cfg["base_model_name_or_path"] == str(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(build_model("qwen2-vl", tied=True), tmp_path / "x").eval()
    assert (logits(loaded) - logits(pm)).abs().max() < 1e-4


@pytest.mark.parametrize("rank,energy", [(2, 0.99), ("auto", 0.6)])
def test_truncated_rank_merges_back_within_reported_error(merged_tied, tmp_path, rank, energy):
    _, base, merged = merged_tied
    report = extract(merged, base, tmp_path / "x", rank=rank, energy=energy)
    lora = [m for m in report.modules if m.kind == "lora"]
    assert all(m.rank <= 3 for m in lora) and report.max_rel_error > 0.05
    merge(tmp_path / "x", base, tmp_path / "back")
    want, got, b0 = _sd(merged), _sd(tmp_path / "back"), _sd(base)
    for m in lora:
        k = f"{m.module}.weight"
        rel = ((got[k] - want[k]).norm() / (want[k] - b0[k]).norm()).item()
        assert rel <= m.rel_error + 1e-5, (k, rel, m.rel_error)
    for k in ("lm_head.weight", "model.language_model.embed_tokens.weight"):
        assert torch.equal(got[k], want[k])


def test_conv_and_bias_changes(qwen2_vl_base, tmp_path):
    model, base = qwen2_vl_base
    for variant in ("conv-lora", "bias-all"):
        _, adapter = make_adapter(model, ADAPTER_VARIANTS[variant]("x"), tmp_path / f"a-{variant}")
        merge(adapter, base, tmp_path / f"m-{variant}")
        report = extract(tmp_path / f"m-{variant}", base, tmp_path / f"x-{variant}", rank=4)
        merge(tmp_path / f"x-{variant}", base, tmp_path / f"b-{variant}")
        want, got = _sd(tmp_path / f"m-{variant}"), _sd(tmp_path / f"b-{variant}")
        assert max((got[k] - want[k]).abs().max().item() for k in want) < 1e-5, variant
        if variant == "conv-lora":
            assert [(m.module, m.kind) for m in report.modules] == [("model.visual.patch_embed.proj", "lora")]
        else:
            assert {m.kind for m in report.modules} == {"lora", "bias"}


def test_identical_models_give_an_empty_adapter_and_wrong_base_is_refused(qwen2_vl_base, qwen25_vl_base, tmp_path):
    _, base = qwen2_vl_base
    with pytest.raises(UsageError):
        extract(base, base, base / "x")
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in base.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    report = extract(copy, base, tmp_path / "x")
    assert report.modules == [] and report.notes and report.config["target_modules"] == "dummy-target-modules"
    with pytest.raises(CheckpointError, match="wrong base"):
        extract(copy, qwen25_vl_base[1], tmp_path / "y")
    with pytest.raises(UsageError):
        extract(copy, base, tmp_path / "z", rank=0)


def test_rank_choice_and_svd_factors():
    s = torch.tensor([4.0, 2.0, 1.0, 0.0])
    assert choose_rank(s, "auto", 0.5) == 1 and choose_rank(s, "auto", 0.9) == 2 and choose_rank(s, "auto", 1.0) == 3
    assert choose_rank(s, 10, 0.9) == 4 and choose_rank(torch.zeros(3), "auto", 0.9) == 1
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(30, 3, generator=g) @ torch.randn(3, 20, generator=g)
    a, b, err = svd_factors(delta, 3)
    assert a.shape == (3, 20) and b.shape == (30, 3) and err < 1e-6
    torch.testing.assert_close(b @ a, delta, atol=1e-4, rtol=1e-4)
    a, b, err = svd_factors(delta, 1)
    assert abs(((b @ a - delta).norm() / delta.norm()).item() - err) < 1e-4


def _low_rank_plus_noise(rows=1100, cols=1300, rank=8, noise=1e-3):
    g = torch.Generator().manual_seed(0)
    return torch.randn(rows, rank, generator=g) @ torch.randn(rank, cols, generator=g) + noise * torch.randn(rows, cols, generator=g)


def test_randomized_svd_on_large_matrices():
    delta = _low_rank_plus_noise()
    a, b, err, how = _svd(delta, 8)
    assert how == "lowrank" and a.shape == (8, 1300) and b.shape == (1100, 8)
    actual = ((b @ a - delta).norm() / delta.norm()).item()
    _, _, exact_err, exact = _svd(delta, 8, method="exact")
    assert exact == "exact" and abs(actual - err) < 1e-5 and abs(err - exact_err) < 1e-5  # the reported error is the true one
    again = _svd(delta, 8)
    assert torch.equal(again[0], a) and torch.equal(again[1], b)  # seeded: reproducible
    # rank auto needs a bound for the randomized path: --max-rank gives it
    assert _svd(delta, "auto", 0.99)[3] == "exact"
    a, _, err, how = _svd(delta, "auto", 0.999, max_rank=32)
    assert how == "lowrank" and a.shape[0] == 8 and err < 1e-3
    # --sv-epsilon drops the noise's singular values on both paths, --max-rank caps
    for method in ("lowrank", "exact"):
        assert _svd(delta, 20, sv_epsilon=1.0, method=method)[0].shape[0] == 8
        assert _svd(delta, 20, max_rank=3, method=method)[0].shape[0] == 3
    small = _low_rank_plus_noise(100, 90)
    assert _svd(small, 8)[3] == "exact"  # small matrices: the exact SVD


def test_include_exclude_max_rank(merged_tied, tmp_path):
    _, base, merged = merged_tied
    report = extract(merged, base, tmp_path / "x", rank=4, max_rank=2, include=r"language_model\.layers\.0\.", exclude=r"mlp")
    mods = {m.module for m in report.modules}
    assert mods and all(".layers.0." in m and "mlp" not in m for m in mods)
    assert {m.rank for m in report.modules} == {2} and any("left out" in n for n in report.notes)
    cfg = json.loads((tmp_path / "x" / "adapter_config.json").read_text())
    assert cfg["r"] == 2 and cfg["modules_to_save"] is None
    with pytest.raises(UsageError, match="--include"):
        extract(merged, base, tmp_path / "y", include="(")
    with pytest.raises(UsageError, match="--max-rank"):
        extract(merged, base, tmp_path / "y", max_rank=0)
    with pytest.raises(UsageError, match="--sv-epsilon"):
        extract(merged, base, tmp_path / "y", sv_epsilon=-1.0)
    assert not (tmp_path / "y").exists()
