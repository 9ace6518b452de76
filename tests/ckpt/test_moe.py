"""Qwen3-VL-MoE and PEFT ``target_parameters`` (fused experts, router): inspect, merge, convert, diff,
audit. PEFT is the oracle: the merge equals ``merge_and_unload`` bit for bit and the merged dir reproduces
the PeftModel's logits; hub-layout bases (experts stored transposed) merge in their own layout."""

from __future__ import annotations

import copy
import shutil
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

from qvl_plugin.ckpt.convert import convert
from qvl_plugin.ckpt.inspect import summarize
from qvl_plugin.ckpt.merge import merge
from qvl_plugin.ckpt.view import open_checkpoint
from tests.factories import MOE_EXPERTS, MOE_FAMILY, build_model, hub_layout_base, logits, make_adapter, make_clean_dump, save_base

TOL = 1e-4
ROUTER = "mlp.gate.weight"


def _cfg(router: bool = True, r: int = 3) -> LoraConfig:
    return LoraConfig(r=r, lora_alpha=5, target_modules=["q_proj", "v_proj"],
                      target_parameters=MOE_EXPERTS + ([ROUTER] if router else []))


def _load(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForImageTextToText.from_pretrained(path).eval()


@pytest.fixture(scope="module")
def moe_adapter(qwen3_vl_moe_base, tmp_path_factory):
    model, base = qwen3_vl_moe_base
    pm, path = make_adapter(model, _cfg(), tmp_path_factory.mktemp("moe") / "adapter")
    return pm, path


def _peft_merged_state(pm) -> dict[str, torch.Tensor]:
    return {k: v for k, v in copy.deepcopy(pm).merge_and_unload().state_dict().items()}


def test_inspect_reports_layout_true_rank_and_targeted_parameters(moe_adapter, qwen3_vl_moe_base):
    _, path = moe_adapter
    with open_checkpoint(path) as c:
        s = summarize(c)
    assert s["layout"] == MOE_FAMILY
    lora = s["lora"]
    assert lora["rank"] == 3, lora["rank"]  # not r·E = 12
    assert lora["target_parameters"] == sorted(MOE_EXPERTS + [ROUTER])
    assert lora["num_experts"] == 4
    assert {"experts", "router"} <= {g for g, v in s["groups"].items() if v["tensors"]}
    with open_checkpoint(qwen3_vl_moe_base.path) as b:
        assert b.layout.name == MOE_FAMILY
        assert b.layout.group("model.language_model.layers.1.mlp.experts") == "experts"
        assert b.layout.group("model.language_model.layers.1.mlp.gate") == "router"


@pytest.mark.parametrize("hub", [False, True], ids=["memory-layout-base", "hub-layout-base"])
def test_merge_is_peft_merge_and_unload_bit_for_bit(moe_adapter, qwen3_vl_moe_base, tmp_path, hub):
    pm, adapter = moe_adapter
    base = qwen3_vl_moe_base.path
    if hub:
        base = hub_layout_base(shutil.copytree(base, tmp_path / "hub"))
    merge(adapter, base, tmp_path / "out")
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    want = _peft_merged_state(pm)
    base_sd = load_file(str(base / "model.safetensors"))
    assert set(got) == set(base_sd)
    changed = 0
    for k, v in got.items():
        assert v.shape == base_sd[k].shape  # the base file's own layout is kept
        mem = v.transpose(1, 2) if hub and k.endswith(tuple(MOE_EXPERTS)) else v
        assert torch.equal(mem, want[k]), k
        changed += not torch.equal(v, base_sd[k])
    assert changed == 2 * 2 + 2 + 4  # per layer: 2 expert tensors + router; q_proj, v_proj
    merged = _load(tmp_path / "out")
    assert (logits(merged) - logits(pm)).abs().max().item() < TOL


def test_merge_bf16_matches_peft_and_streams_expert_slices(qwen3_vl_moe_base, tmp_path):
    from qvl_plugin.ckpt import merge_params

    model = build_model(MOE_FAMILY).to(torch.bfloat16)
    base = save_base(model, tmp_path / "base")
    pm, adapter = make_adapter(model, _cfg(router=False), tmp_path / "adapter")
    want = _peft_merged_state(pm)
    real = merge_params._experts_per_chunk
    merge_params._experts_per_chunk = lambda shape: 1  # one expert per slice: the same bits as the whole
    try:
        merge(adapter, base, tmp_path / "out")
    finally:
        merge_params._experts_per_chunk = real
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    for k, v in got.items():
        assert torch.equal(v, want[k]), k


def test_merge_from_dump_and_convert_round_trip(moe_adapter, qwen3_vl_moe_base, tmp_path):
    pm, adapter = moe_adapter
    dump = make_clean_dump(pm, tmp_path / "adapter.pth")
    merge(dump, qwen3_vl_moe_base.path, tmp_path / "out", adapter_config=adapter / "adapter_config.json")
    assert (logits(_load(tmp_path / "out")) - logits(pm)).abs().max().item() < TOL
    # a dump without its config: the nesting levels equal the experts' parameter count -> unambiguous
    convert(dump, "peft", tmp_path / "peft", lora_alpha=5, base=qwen3_vl_moe_base.path)
    saved, again = load_file(str(adapter / "adapter_model.safetensors")), load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert set(saved) == set(again) and all(torch.equal(saved[k], again[k]) for k in saved)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(copy.deepcopy(qwen3_vl_moe_base.model), tmp_path / "peft").eval()
    assert torch.equal(logits(loaded), logits(pm))
    # peft -> pth gives PEFT's in-memory names
    rep = convert(adapter, "pth", tmp_path / "back.pth", base=qwen3_vl_moe_base.path)
    sd = torch.load(tmp_path / "back.pth", weights_only=True)
    mem = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert set(sd) == mem
    assert rep.load == {"unexpected": [], "missing_adapter": []} or not rep.load.get("unexpected")


def test_diff_by_effect_and_audit(moe_adapter, qwen3_vl_moe_base, tmp_path):
    from qvl_plugin.ckpt.audit import audit
    from qvl_plugin.ckpt.diff import diff_checkpoints as diff

    pm, adapter = moe_adapter
    dump = make_clean_dump(pm, tmp_path / "adapter.pth")
    d = diff(adapter, dump, adapter_config=adapter / "adapter_config.json")
    assert d.equal
    other, other_path = make_adapter(qwen3_vl_moe_base.model, _cfg(), tmp_path / "other", seed=7)
    d = diff(adapter, other_path)
    rows = {r.name: r for r in d.rows}
    gu = rows["model.language_model.layers.0.mlp.experts.gate_up_proj"]
    # by effect, expert by expert: the Frobenius distance of the two (E, out, in) deltas
    ex = lambda m: m.base_model.model.model.language_model.layers[0].mlp.experts.base_layer
    want = (ex(pm).get_delta_weight("default") - ex(other).get_delta_weight("default")).norm().item()
    assert gu.shape_a == (4, 48, 64) and abs(gu.diff_norm - want) < 1e-4 * want
    merge(adapter, qwen3_vl_moe_base.path, tmp_path / "out")
    d = diff(adapter, tmp_path / "out", base=qwen3_vl_moe_base.path, atol=1e-5)
    assert d.equal, [r for r in d.rows if not r.equal][:3]
    d = diff(adapter, qwen3_vl_moe_base.path, base=qwen3_vl_moe_base.path)
    assert not d.equal
    assert any(g.group == "experts" for g in d.groups())
    findings = audit(adapter, base=qwen3_vl_moe_base.path)
    assert not [f for f in findings if f.severity == "error"], findings


def test_extract_of_a_merged_moe_model_reloads_it(moe_adapter, qwen3_vl_moe_base, tmp_path):
    """Changed experts come back as modules_to_save, the router's LoRA through target_parameters (it is
    no Linear); the extracted adapter on the base reproduces the merged model."""
    from qvl_plugin.ckpt.extract import extract

    pm, adapter = moe_adapter
    merge(adapter, qwen3_vl_moe_base.path, tmp_path / "merged")
    extract(tmp_path / "merged", qwen3_vl_moe_base.path, tmp_path / "x")
    import json

    cfg = json.loads((tmp_path / "x" / "adapter_config.json").read_text())
    assert cfg["target_parameters"] == [f"model.language_model.layers.{i}.mlp.gate.weight" for i in (0, 1)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(copy.deepcopy(qwen3_vl_moe_base.model), tmp_path / "x").eval()
    assert (logits(loaded) - logits(_load(tmp_path / "merged"))).abs().max().item() < TOL


def test_refusals_are_one_error_line(moe_adapter, qwen3_vl_moe_base, qwen3_vl_base, tmp_path):
    """Bad input: one `error:` line, exit 1, nothing written."""
    from click.testing import CliRunner

    from qvl_plugin.cli import main

    pm, adapter = moe_adapter
    run = lambda *a: CliRunner().invoke(main, [str(x) for x in a])  # noqa: E731
    # an expert adapter on the dense Qwen3-VL: no expert tensors there
    res = run("merge", adapter, "--base", qwen3_vl_base.path, "-o", tmp_path / "o1")
    # a dump of only gate_up_proj LoRA without its config: which parameter is ambiguous
    pm2, _ = make_adapter(qwen3_vl_moe_base.model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"],
                                                              target_parameters=["mlp.experts.gate_up_proj"]))
    dump = make_clean_dump(pm2, tmp_path / "one.pth")
    res2 = run("merge", dump, "--base", qwen3_vl_moe_base.path, "--lora-alpha", 4, "-o", tmp_path / "o2")
    for r, what in ((res, "no base tensor"), (res2, "adapter_config")):
        assert r.exit_code == 1, r.output
        lines = [ln for ln in r.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and what in lines[0], r.output
        assert "Traceback" not in r.output
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    # with the run's config the same dump merges and matches PEFT
    cfg = tmp_path / "cfg"
    pm2.save_pretrained(cfg)
    assert run("merge", dump, "--base", qwen3_vl_moe_base.path, "--adapter-config", cfg / "adapter_config.json", "-o", tmp_path / "o3").exit_code == 0
    assert (logits(_load(tmp_path / "o3")) - logits(pm2)).abs().max().item() < TOL


def _expert_pair(d, experts: int, out_f: int = 1024, in_f: int = 2048, r: int = 4):
    """A zero bf16 fused-expert stack and a random target_parameters adapter for it."""
    import json

    from safetensors.torch import save_file

    d.mkdir(parents=True)
    key = "model.language_model.layers.0.mlp.experts.gate_up_proj"
    save_file({key: torch.zeros(experts, out_f, in_f, dtype=torch.bfloat16),
               "model.language_model.layers.0.mlp.gate.weight": torch.zeros(experts, in_f, dtype=torch.bfloat16)},
              str(d / "base.safetensors"))
    ad = d / "adapter"
    ad.mkdir()
    g = torch.Generator().manual_seed(0)
    prefix = "base_model.model." + key.rpartition(".")[0]
    save_file({f"{prefix}.lora_A.weight": torch.randn(r * experts, in_f, generator=g),
               f"{prefix}.lora_B.weight": torch.randn(out_f, r * experts, generator=g)}, str(ad / "adapter_model.safetensors"))
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": 8, "target_modules": [],
                                                        "target_parameters": ["mlp.experts.gate_up_proj"]}))
    return key, ad


def test_expert_merge_streams_in_bounded_memory(tmp_path):
    """Merging a 256 MB fused-expert tensor grows RSS by no more than merging one 4x smaller, plus a small
    margin: one slice of experts at a time (read, delta, write), never the whole stack or its fp32 delta
    (768 MB). The comparison cancels the fixed costs (buffers, the writer thread, direct-I/O staging)."""
    import json
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc to reset the peak RSS")
    e, out_f, in_f, r = 64, 1024, 2048, 4
    key, ad = _expert_pair(tmp_path / "big", e, out_f, in_f, r)
    _expert_pair(tmp_path / "small", e // 4, out_f, in_f, r)
    code = textwrap.dedent("""
        import json, sys
        from pathlib import Path
        from qvl_plugin.ckpt.merge import merge
        def rss(field):
            return next(int(l.split()[1]) * 1024 for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
        Path("/proc/self/clear_refs").write_text("5")
        base = rss("VmRSS")
        merge(sys.argv[1], sys.argv[2], sys.argv[3])
        print(json.dumps({"growth": rss("VmHWM") - base}))
    """)
    growth = {}
    for name in ("small", "big"):  # each in a fresh process with the imports warmed before measuring
        d = tmp_path / name
        proc = subprocess.run([sys.executable, "-c", "import qvl_plugin.ckpt.merge, torch, safetensors, peft, transformers\n" + code,
                               str(d / "adapter"), str(d / "base.safetensors"), str(d / "out")], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        growth[name] = json.loads(proc.stdout.strip().splitlines()[-1])["growth"]
    tensor = e * out_f * in_f * 2
    # measured: both ~90-110 MB (fixed costs and a few expert slices); merging the whole tensor at once would
    # add its bf16 copy plus a 512 MB fp32 delta to the big one
    assert growth["big"] - growth["small"] < tensor / 4, \
        f"RSS grew {growth['big'] / 2**20:.0f} MB merging a {tensor / 2**20:.0f} MB expert tensor, {growth['small'] / 2**20:.0f} MB for one 4x smaller"
    from safetensors import safe_open

    with safe_open(str(tmp_path / "big" / "out" / "model.safetensors"), "pt") as f:
        got = f.get_slice(key)[5:6]
    from qvl_plugin.ckpt import merge_math as mm

    a, b = load_file(str(ad / "adapter_model.safetensors")).values()
    want = mm.merge_param(torch.zeros(1, out_f, in_f, dtype=torch.bfloat16), mm.param_delta(a, b, 8 / r, e, start=5, stop=6))
    assert torch.equal(got, want)
