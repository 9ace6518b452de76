"""diff: one canonical row per tensor whatever the format, LoRA compared by effect, streamed statistics."""

from __future__ import annotations


import pytest
import torch
from peft import LoraConfig

from qvl_plugin.ckpt.diff import diff_checkpoints
from qvl_plugin.ckpt.effect import lora_effect_stats, tensor_stats
from qvl_plugin.errors import UsageError
from tests.factories import ADAPTER_VARIANTS, make_adapter, make_clean_dump, make_dump, rewrite_adapter, to_legacy_key

QV = ["q_proj", "v_proj"]
MTS = LoraConfig(r=4, lora_alpha=8, target_modules=QV, modules_to_save=["embed_tokens", "lm_head"])




@pytest.fixture(scope="module")
def run(qwen2_vl_tied_base, tmp_path_factory):
    """One 'training run' on the tied tiny Qwen2-VL: its adapter, its seed-style dump, a second run."""
    model, base = qwen2_vl_tied_base
    tmp = tmp_path_factory.mktemp("diff")
    peft_model, adapter = make_adapter(model, MTS, tmp / "adapter", seed=1)
    dump = make_dump(peft_model, tmp / "dump.pth")
    _, other = make_adapter(model, MTS, tmp / "other", seed=2)
    return dict(model=model, base=base, adapter=adapter, dump=dump, other=other, peft_model=peft_model, tmp=tmp)


# ----------------------------------------------------------------------------------------------------------
# the math


@pytest.mark.parametrize(
    "shape_a1, shape_b1, shape_a2, shape_b2",
    [
        ((4, 32), (48, 4), (4, 32), (48, 4)),  # Linear, same rank
        ((4, 32), (48, 4), (8, 32), (48, 8)),  # rank change
        ((2, 3, 2, 5, 5), (16, 2, 1, 1, 1), (3, 3, 2, 5, 5), (16, 3, 1, 1, 1)),  # Conv3d
        ((4, 100), (16, 4), (4, 100), (16, 4)),  # embedding factors (r, vocab), (dim, r)
    ],
)
def test_frobenius_from_factors_equals_dense(shape_a1, shape_b1, shape_a2, shape_b2):
    g = torch.Generator().manual_seed(0)
    a1, b1, a2, b2 = (torch.randn(s, generator=g) for s in (shape_a1, shape_b1, shape_a2, shape_b2))
    s1, s2 = 2.0, 0.7
    dense = lambda a, b, s: s * (b.reshape(b.shape[0], -1).double() @ a.reshape(a.shape[0], -1).double())
    d1, d2 = dense(a1, b1, s1), dense(a2, b2, s2)
    max_abs, diff, norm_b = lora_effect_stats(a1, b1, s1, a2, b2, s2, chunk=64)  # small chunks: many row blocks
    assert diff == pytest.approx(torch.linalg.norm(d1 - d2).item(), rel=1e-9)
    assert norm_b == pytest.approx(torch.linalg.norm(d2).item(), rel=1e-9)
    assert max_abs == pytest.approx((d1 - d2).abs().max().item(), rel=1e-5)


def test_lora_effect_equivalent_factors_are_equal():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 32, generator=g), torch.randn(48, 4, generator=g)
    assert lora_effect_stats(a, b, 2.0, a / 2, b * 2, 2.0)[1] <= 1e-9
    # the same delta through a different scaling
    max_abs, diff, _ = lora_effect_stats(a, b, 2.0, a, b * 4, 0.5)
    assert diff <= 1e-9 and max_abs in (None, 0.0)
    # within atol the out x in product is never formed: max abs is not reported
    max_abs, diff, _ = lora_effect_stats(a, b, 2.0, a / 3, b * 3, 2.0, atol=1e-5)
    assert max_abs is None or max_abs <= 1e-5
    assert diff <= 1e-5


def test_tensor_stats_chunked_equals_dense():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(37, 11, generator=g)
    b = a + torch.randn(37, 11, generator=g) * 1e-3
    max_abs, diff, norm_b = tensor_stats(a, b.to(torch.bfloat16), chunk=10)
    ref = a.double() - b.to(torch.bfloat16).double()
    assert max_abs == pytest.approx(ref.abs().max().item())
    assert diff == pytest.approx(ref.norm().item())
    assert norm_b == pytest.approx(b.to(torch.bfloat16).double().norm().item())


# ----------------------------------------------------------------------------------------------------------
# adapters against adapters


def test_dump_vs_adapter_of_the_same_run_is_equal(run):
    report = diff_checkpoints(run["dump"], run["adapter"])
    assert report.equal and report.mode == "adapter"
    # one row per canonical tensor: 4 LoRA effects + embed + head, though the dump has 20 keys
    assert len(report.rows) == 6
    assert {r.kind for r in report.rows} == {"lora", "tensor"}
    assert any("no lora_alpha" in n for n in report.notes)
    # alpha given explicitly: no borrowing
    assert not any("no lora_alpha" in n for n in diff_checkpoints(run["dump"], run["adapter"], lora_alpha=8).notes)


@pytest.mark.parametrize("dump", ["seed", "clean"])
@pytest.mark.parametrize("variant", sorted(ADAPTER_VARIANTS))
def test_dump_vs_adapter_of_the_same_run_is_equal_for_every_variant(qwen2_vl_base, tmp_path, variant, dump):
    """Token rows borrow the adapter's indices; PEFT's saved base layer (embedding LoRA) is noted, not a row."""
    peft_model, adapter = make_adapter(qwen2_vl_base.model, ADAPTER_VARIANTS[variant]("qwen2-vl"), tmp_path / "adapter")
    pth = (make_dump if dump == "seed" else make_clean_dump)(peft_model, tmp_path / "dump.pth")
    report = diff_checkpoints(pth, adapter)
    assert report.equal, [(r.name, r.kind, r.status, r.note) for r in report.changed]
    if variant == "embedding-lora":
        assert any("saved copy of the base layer" in n for n in report.notes)
        # a saved base layer that differs from BASE is a difference once BASE is given
        assert diff_checkpoints(pth, adapter, base=qwen2_vl_base.path).equal
        moved = rewrite_adapter(adapter, tmp_path / "moved", lambda sd: {k: v + 1 if ".base_layer." in k else v for k, v in sd.items()})
        assert not diff_checkpoints(pth, moved, base=qwen2_vl_base.path).equal


def test_diff_cli_exits_0_for_dump_vs_adapter_with_token_rows_and_embedding_lora(qwen2_vl_base, tmp_path):
    from click.testing import CliRunner

    from qvl_plugin.cli import main

    for variant in ("tokens", "embedding-lora"):
        peft_model, adapter = make_adapter(qwen2_vl_base.model, ADAPTER_VARIANTS[variant]("qwen2-vl"), tmp_path / variant)
        pth = make_dump(peft_model, tmp_path / f"{variant}.pth")
        result = CliRunner().invoke(main, ["diff", str(pth), str(adapter)])
        assert result.exit_code == 0, result.output


def test_legacy_and_new_layout_adapter_are_one_row_each(run):
    legacy = rewrite_adapter(run["adapter"], run["tmp"] / "legacy", lambda sd: {to_legacy_key(k): v for k, v in sd.items()})
    report = diff_checkpoints(legacy, run["adapter"])
    assert report.equal and len(report.rows) == 6
    assert all(r.keys_a != r.keys_b for r in report.rows if r.kind == "lora")


def test_two_runs_differ_and_largest_change_comes_first(run):
    def edit(sd):
        k = "base_model.model.model.language_model.layers.1.self_attn.v_proj.lora_B.weight"
        sd[k] = sd[k] * 1.5
        head = "base_model.model.lm_head.weight"
        sd[head] = sd[head] + 1e-4
        return sd

    changed = rewrite_adapter(run["adapter"], run["tmp"] / "edited", edit)
    report = diff_checkpoints(changed, run["adapter"])
    assert not report.equal
    rows = report.changed
    assert [r.name for r in rows] == ["model.language_model.layers.1.self_attn.v_proj.weight", "lm_head.weight"]
    assert rows[0].kind == "lora" and rows[0].rel == pytest.approx(0.5, rel=1e-6)
    assert rows[1].max_abs == pytest.approx(1e-4, rel=1e-2)
    groups = report.groups()
    assert (groups[0].group, groups[0].layer) == ("language", 1) and groups[1].group == "head"
    assert all(g.changed == 0 for g in groups[2:])
    # within atol: equal
    assert not diff_checkpoints(changed, run["adapter"], atol=1e-3).equal  # the v_proj change is large
    other = diff_checkpoints(run["other"], run["adapter"])
    assert len(other.changed) == 6
    rels = [r.rel for r in other.rows]
    assert rels == sorted(rels, reverse=True)


def test_lora_pairs_compare_by_effect_not_factors(run):
    def rescale(c):
        def fn(sd):
            for k in sd:
                if ".lora_A." in k:
                    sd[k] = sd[k] / c
                elif ".lora_B." in k:
                    sd[k] = sd[k] * c
            return sd

        return fn

    exact = rewrite_adapter(run["adapter"], run["tmp"] / "x2", rescale(2.0))
    assert diff_checkpoints(exact, run["adapter"]).equal
    inexact = rewrite_adapter(run["adapter"], run["tmp"] / "x3", rescale(3.0))
    assert diff_checkpoints(inexact, run["adapter"], atol=1e-6).equal

    def grow_rank(sd):  # r 4 -> 8: extra rows of A meet zero columns of B; same delta
        for k in list(sd):
            if ".lora_A." in k:
                sd[k] = torch.cat([sd[k], torch.randn_like(sd[k])])
            elif ".lora_B." in k:
                sd[k] = torch.cat([sd[k], torch.zeros_like(sd[k])], dim=1)
        return sd

    wider = rewrite_adapter(run["adapter"], run["tmp"] / "r8", grow_rank)
    # alpha 8 -> scaling 8/8 instead of 8/4: equal only once B is scaled back
    report = diff_checkpoints(wider, run["adapter"])
    lora_rows = [r for r in report.rows if r.kind == "lora"]
    assert all(r.note == "rank 8 -> 4" for r in lora_rows)
    assert all(r.rel == pytest.approx(0.5) for r in lora_rows)


# ----------------------------------------------------------------------------------------------------------
# full models and effective weights


@pytest.fixture(scope="module")
def merged(run):
    """The run merged: by qvl_plugin's merge when it exists, else PEFT's merge_and_unload."""
    out = run["tmp"] / "merged"
    try:
        from qvl_plugin.ckpt.merge import merge
    except ImportError:
        merge = None
    if merge is not None:
        merge(run["adapter"], run["base"], out)
    else:
        import copy

        copy.deepcopy(run["peft_model"]).merge_and_unload().save_pretrained(out)
    return out


def test_merged_vs_base_lists_the_trained_tensors(run, merged):
    report = diff_checkpoints(merged, run["base"])
    assert report.mode == "tensor" and not report.equal
    changed = {r.name for r in report.changed}
    expected = {f"model.language_model.layers.{i}.self_attn.{p}.weight" for i in (0, 1) for p in ("q_proj", "v_proj")}
    assert changed == expected | {"model.language_model.embed_tokens.weight", "lm_head.weight"}
    # the tied base stores no lm_head: its head row is the embedding matrix, not "only in A"
    assert not report.only_a and not report.only_b
    same = diff_checkpoints(run["base"], run["base"])
    assert same.equal and len(same.rows) > 40


def test_adapter_plus_base_equals_its_merge(run, merged):
    report = diff_checkpoints(run["adapter"], merged, base=run["base"], atol=1e-6)
    assert report.mode == "effective"
    assert report.equal, [r.to_dict() for r in report.changed[:3]]
    assert len(report.rows) >= 40  # every base tensor, streamed
    other = diff_checkpoints(run["other"], merged, base=run["base"], atol=1e-6)
    assert {r.name for r in other.changed} >= {"lm_head.weight", "model.language_model.embed_tokens.weight"}
    # two adapters through the base: only the tensors they touch
    two = diff_checkpoints(run["dump"], run["adapter"], base=run["base"], lora_alpha=8)
    assert two.equal and len(two.rows) == 6


def test_adapter_vs_merged_without_base_is_a_usage_error(run, merged):
    with pytest.raises(UsageError, match="--base"):
        diff_checkpoints(run["adapter"], merged)
    with pytest.raises(UsageError, match="atol"):
        diff_checkpoints(run["adapter"], run["adapter"], atol=-1)


@pytest.mark.parametrize("variant", sorted(ADAPTER_VARIANTS))
def test_effective_weights_match_peft_merge_for_every_variant(qwen2_vl_base, tmp_path, variant):
    """adapter + base vs PEFT's merge_and_unload, bit for bit (DoRA, embedding, conv, bias, tokens, patterns)."""
    model, base = qwen2_vl_base
    peft_model, adapter = make_adapter(model, ADAPTER_VARIANTS[variant]("qwen2-vl"), tmp_path / "a")
    peft_model.merge_and_unload().save_pretrained(tmp_path / "merged")
    report = diff_checkpoints(adapter, tmp_path / "merged", base=base)
    assert report.equal, [r.to_dict() for r in report.changed[:3]]
    assert not diff_checkpoints(adapter, base, base=base).equal
