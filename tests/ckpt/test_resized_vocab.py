"""Resized vocabularies (new tokens) merged onto the ORIGINAL base: the merged dir loads with
``from_pretrained`` unchanged and reproduces the trained PeftModel's logits over every row, new ids included.

Adapters are made by PEFT on a copy of the base after ``resize_token_embeddings`` (the new rows get
transformers' own random init, so a merge that loses them shows), in each way PEFT saves new rows:
modules_to_save, the saved base layer of a LoRA-targeted embedding (``save_embedding_layers=True``),
trainable-token rows on top of a saved base layer.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from click.testing import CliRunner
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForImageTextToText

from qvl_plugin.ckpt.merge import merge
from qvl_plugin.cli import main
from tests.factories import make_clean_dump

QV = ["q_proj", "v_proj"]
GROWN, SHRUNK = 300, 250


def resized(model, rows: int):
    m = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        m.resize_token_embeddings(rows, mean_resizing=False)
    return m


def train(model, config: LoraConfig, path, *, save_embedding_layers=True, seed: int = 1):
    """get_peft_model + every trainable tensor perturbed (simulated training), saved by PEFT itself."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            pm = get_peft_model(copy.deepcopy(model), copy.deepcopy(config))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, p in pm.named_parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.05)
        pm.eval()
        pm.save_pretrained(path, save_embedding_layers=save_embedding_layers)
    return pm


def new_token_inputs(rows: int) -> dict:
    """Ids over the whole resized range, new ids (>= 256) included."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, min(rows, 240), (2, 10), generator=g)
    ids[:, 2] = rows - 1
    ids[1, 7] = rows - 2
    ids[0, 5] = rows - 44
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.no_grad()
def check_reproduces(pm, out, rows: int) -> dict:
    merged = AutoModelForImageTextToText.from_pretrained(str(out), dtype=torch.float32).eval()
    inputs = new_token_inputs(rows)
    want, got = pm(**inputs).logits.float(), merged(**inputs).logits.float()
    assert got.shape[-1] == rows
    assert (got - want).abs().max().item() < 1e-4
    assert merged.get_input_embeddings().weight.shape[0] == rows
    return json.loads((out / "config.json").read_text())


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _one_error(r, tmp_path, *needles):
    assert r.exit_code == 1, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.output, r.output
    for n in needles:
        assert n in lines[0], lines[0]
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if ".qvl-tmp-" in p.name]


CASES = {
    "modules-to-save": LoraConfig(r=4, lora_alpha=8, target_modules=QV, modules_to_save=["embed_tokens", "lm_head"]),
    "lora-embed+mts-head": LoraConfig(r=4, lora_alpha=8, target_modules=QV + ["embed_tokens"], modules_to_save=["lm_head"]),
    "lora-embed+lora-head": LoraConfig(r=4, lora_alpha=8, target_modules=QV + ["embed_tokens", "lm_head"]),
    "tokens": LoraConfig(r=4, lora_alpha=8, target_modules=QV, trainable_token_indices={"embed_tokens": [5, 256, 280, 299]}),
}


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("case", list(CASES))
def test_grown_vocab_merges_onto_the_original_base(case, tied, qwen2_vl_base, qwen2_vl_tied_base, tmp_path):
    model, base = qwen2_vl_tied_base if tied else qwen2_vl_base
    pm = train(resized(model, GROWN), CASES[case], tmp_path / "adapter")
    (tmp_path / "adapter" / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {str(i): {"content": f"<t{i}>"} for i in range(256, 300)}}))
    report = merge(tmp_path / "adapter", base, tmp_path / "out")
    cfg = check_reproduces(pm, tmp_path / "out", GROWN)
    assert cfg["text_config"]["vocab_size"] == GROWN and cfg["vocab_size"] == GROWN
    assert any("grown from 256 to 300" in n for n in report.notes)
    assert any("tokenizer files from" in n and "tokenizer_config.json" in n for n in report.notes)
    assert "<t299>" in (tmp_path / "out" / "tokenizer_config.json").read_text()  # SRC's, over the base's
    if tied:
        same = case == "tokens"  # token rows on one shared saved matrix: both sides stay bit-identical
        assert cfg["tie_word_embeddings"] is (True if same else False)


def test_tied_lora_embedding_alone_keeps_the_saved_base_layer_as_head(qwen2_vl_tied_base, tmp_path):
    """Tied base, LoRA on the resized embedding only: the trained head is the saved base layer (PEFT tied it)."""
    model, base = qwen2_vl_tied_base
    pm = train(resized(model, GROWN), LoraConfig(r=4, lora_alpha=8, target_modules=QV + ["embed_tokens"]), tmp_path / "adapter")
    report = merge(tmp_path / "adapter", base, tmp_path / "out")
    cfg = check_reproduces(pm, tmp_path / "out", GROWN)
    assert cfg["tie_word_embeddings"] is False and report.added == ["lm_head.weight"]
    assert any("SRC ships no tokenizer" in n for n in report.notes)


def test_ensure_weight_tying_keeps_one_matrix(qwen2_vl_tied_base, tmp_path):
    model, base = qwen2_vl_tied_base
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=QV, modules_to_save=["embed_tokens"], ensure_weight_tying=True)
    pm = train(resized(model, GROWN), cfg, tmp_path / "adapter")
    report = merge(tmp_path / "adapter", base, tmp_path / "out")
    out = check_reproduces(pm, tmp_path / "out", GROWN)
    assert out["tie_word_embeddings"] is True and report.added == [] and not report.untied


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_shrunk_vocab_and_the_pth_dump(tied, qwen2_vl_base, qwen2_vl_tied_base, tmp_path):
    model, base = qwen2_vl_tied_base if tied else qwen2_vl_base
    pm = train(resized(model, SHRUNK), CASES["modules-to-save"], tmp_path / "adapter")
    (tmp_path / "run").mkdir()
    dump = make_clean_dump(pm, tmp_path / "run" / "adapter.pth")
    r = _run("merge", dump, "--base", base, "-o", tmp_path / "out", "--adapter-config", tmp_path / "adapter" / "adapter_config.json")
    assert r.exit_code == 0, r.output
    assert "shrunk from 256 to 250" in r.output
    cfg = check_reproduces(pm, tmp_path / "out", SHRUNK)
    assert cfg["text_config"]["vocab_size"] == SHRUNK


def test_grown_vocab_from_the_pth_dump_with_pad_to_multiple(qwen2_vl_base, tmp_path):
    model, base = qwen2_vl_base
    m = copy.deepcopy(model)
    m.resize_token_embeddings(260, pad_to_multiple_of=64, mean_resizing=False)
    rows = m.get_input_embeddings().weight.shape[0]
    assert rows == 320
    pm = train(m, CASES["modules-to-save"], tmp_path / "adapter")
    dump = make_clean_dump(pm, tmp_path / "adapter.pth")
    r = _run("merge", dump, "--base", base, "-o", tmp_path / "out", "--lora-alpha", "8")
    assert r.exit_code == 0, r.output
    check_reproduces(pm, tmp_path / "out", rows)


# -- refusals: one error line, exit 1, nothing written --------------------------------------------------------


def test_lora_on_resized_embedding_without_saved_rows_names_the_fix(qwen2_vl_base, tmp_path):
    model, base = qwen2_vl_base
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=QV + ["embed_tokens"], modules_to_save=["lm_head"])
    train(resized(model, GROWN), cfg, tmp_path / "adapter", save_embedding_layers=False)
    r = _run("merge", tmp_path / "adapter", "--base", base, "-o", tmp_path / "out")
    _one_error(r, tmp_path, "resized base rows were not saved", "save_embedding_layers=True")


def test_tokens_beyond_the_base_without_saved_rows_names_the_fix(qwen2_vl_tied_base, tmp_path):
    model, base = qwen2_vl_tied_base
    train(resized(model, GROWN), CASES["tokens"], tmp_path / "adapter", save_embedding_layers="auto")
    r = _run("merge", tmp_path / "adapter", "--base", base, "-o", tmp_path / "out")
    _one_error(r, tmp_path, "token index 299", "save_embedding_layers=True")


def test_untied_base_with_only_the_embedding_resized_is_refused(qwen2_vl_base, tmp_path):
    model, base = qwen2_vl_base
    train(resized(model, GROWN), LoraConfig(r=4, lora_alpha=8, target_modules=QV, modules_to_save=["embed_tokens"]),
          tmp_path / "adapter", save_embedding_layers="auto")  # auto: Qwen2-VL's config has no top-level vocab_size
    r = _run("merge", tmp_path / "adapter", "--base", base, "-o", tmp_path / "out")
    _one_error(r, tmp_path, "only the embedding is resized", "add lm_head to modules_to_save")


def test_tied_modules_to_save_embedding_alone_is_refused(qwen2_vl_tied_base, tmp_path):
    model, base = qwen2_vl_tied_base
    train(resized(model, GROWN), LoraConfig(r=4, lora_alpha=8, target_modules=QV, modules_to_save=["embed_tokens"]),
          tmp_path / "adapter", save_embedding_layers=False)
    r = _run("merge", tmp_path / "adapter", "--base", base, "-o", tmp_path / "out")
    _one_error(r, tmp_path, "ensure_weight_tying=True")


def test_embedding_and_head_resized_differently_is_refused(qwen2_vl_base, tmp_path):
    from safetensors.torch import load_file, save_file

    model, base = qwen2_vl_base
    train(resized(model, GROWN), CASES["modules-to-save"], tmp_path / "adapter")
    f = tmp_path / "adapter" / "adapter_model.safetensors"
    sd = load_file(str(f))
    sd["base_model.model.lm_head.weight"] = sd["base_model.model.lm_head.weight"][:280].contiguous()
    save_file(sd, str(f), metadata={"format": "pt"})
    r = _run("merge", tmp_path / "adapter", "--base", base, "-o", tmp_path / "out")
    _one_error(r, tmp_path, "300 rows but lm_head 280")


def test_other_hidden_size_stays_a_shape_error(qwen2_vl_base, tmp_path):
    from safetensors.torch import load_file, save_file

    model, base = qwen2_vl_base
    train(resized(model, GROWN), CASES["modules-to-save"], tmp_path / "adapter")
    f = tmp_path / "adapter" / "adapter_model.safetensors"
    sd = load_file(str(f))
    for k in list(sd):
        if k.endswith(("embed_tokens.weight", "lm_head.weight")):
            sd[k] = torch.cat([sd[k], sd[k][:, :8]], 1).contiguous()
    save_file(sd, str(f), metadata={"format": "pt"})
    r = _run("merge", tmp_path / "adapter", "--base", base, "-o", tmp_path / "out")
    _one_error(r, tmp_path, "shape [300, 72] but the base has [256, 64]")


# -- audit ------------------------------------------------------------------------------------------------------


def _tokenizer(path, n_new: int):
    """The tiny model's real tokenizer (384 ids) plus ``n_new`` added tokens, saved into ``path``."""
    from transformers import AutoTokenizer

    from qvl_plugin.hosts.tiny import tiny_dir

    tok = AutoTokenizer.from_pretrained(str(tiny_dir()))
    tok.add_tokens([f"<new{i}>" for i in range(n_new)])
    tok.save_pretrained(str(path))
    return len(tok)


def _audit(*args):
    r = _run("audit", *args, "--json")
    return r, json.loads(r.stdout)


def test_audit_reports_the_resize_and_whether_the_tokenizer_fits(qwen2_vl_base, tmp_path):
    model, base = qwen2_vl_base
    train(resized(model, 400), CASES["modules-to-save"], tmp_path / "adapter")
    r, out = _audit(tmp_path / "adapter", "--base", base)
    assert r.exit_code == 0, r.output
    rv = next(f for f in out["findings"] if f["code"] == "resized-vocab")
    assert rv["severity"] == "warning" and "from 256 to 400 rows" in rv["message"] and "SRC ships no tokenizer" in rv["message"]
    assert "cannot encode the new tokens" in rv["message"]
    assert not [f for f in out["findings"] if f["severity"] == "error"]
    assert _run("audit", tmp_path / "adapter", "--base", base, "--strict").exit_code == 1

    assert _tokenizer(tmp_path / "adapter", 16) == 400  # 384 + 16: the new ids fill the new rows
    _, out = _audit(tmp_path / "adapter", "--base", base)
    assert "ships a tokenizer whose ids fit" in next(f for f in out["findings"] if f["code"] == "resized-vocab")["message"]

    _tokenizer(tmp_path / "adapter", 20)  # 404 ids for 400 rows
    _, out = _audit(tmp_path / "adapter", "--base", base)
    assert "needs 404 rows but the model has 400" in next(f for f in out["findings"] if f["code"] == "resized-vocab")["message"]

    # the merged model against its original base: the same warning, not a shape error
    assert merge(tmp_path / "adapter", base, tmp_path / "merged").out.is_dir()
    r, out = _audit(tmp_path / "merged", "--base", base)
    assert r.exit_code == 0, r.output
    assert [f["code"] for f in out["findings"] if f["severity"] != "info"] == ["resized-vocab"]


def test_audit_keeps_shape_mismatch_for_what_cannot_merge(qwen2_vl_base, tmp_path):
    model, base = qwen2_vl_base
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=QV + ["embed_tokens"], modules_to_save=["lm_head"])
    train(resized(model, GROWN), cfg, tmp_path / "unsaved", save_embedding_layers=False)
    r, out = _audit(tmp_path / "unsaved", "--base", base)
    assert r.exit_code == 1
    sm = next(f for f in out["findings"] if f["code"] == "shape-mismatch")
    assert "save_embedding_layers=True" in sm["message"] and not any(f["code"] == "resized-vocab" for f in out["findings"])
    train(resized(model, GROWN), LoraConfig(r=4, lora_alpha=8, target_modules=QV, modules_to_save=["embed_tokens"]),
          tmp_path / "emb-only", save_embedding_layers="auto")
    r, out = _audit(tmp_path / "emb-only", "--base", base)
    assert r.exit_code == 1 and "only the embedding is resized" in next(f for f in out["findings"] if f["code"] == "shape-mismatch")["message"]


# -- diff / convert / extract -------------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_diff_convert_extract_handle_a_resized_pair(tied, qwen2_vl_base, qwen2_vl_tied_base, tmp_path):
    model, base = qwen2_vl_tied_base if tied else qwen2_vl_base
    pm = train(resized(model, GROWN), CASES["lora-embed+mts-head"], tmp_path / "adapter")
    _tokenizer(tmp_path / "adapter", 0)
    merge(tmp_path / "adapter", base, tmp_path / "merged")

    # diff: the adapter's effective weights equal the merged model's; the merged model vs base shows the rows
    r = _run("diff", tmp_path / "adapter", tmp_path / "merged", "--base", base, "--json")
    assert r.exit_code == 0, r.output
    r = _run("diff", tmp_path / "merged", base, "--json")
    assert r.exit_code == 1 and "embed_tokens" in r.stdout and "300" in r.stdout

    # convert: adapter -> pth -> adapter, then the converted adapter merges to the same bytes
    assert _run("convert", tmp_path / "adapter", "--to", "pth", "-o", tmp_path / "c.pth").exit_code == 0
    r = _run("convert", tmp_path / "c.pth", "--to", "peft", "-o", tmp_path / "c", "--lora-alpha", "8", "--base", base)
    assert r.exit_code == 0, r.output
    merge(tmp_path / "c", base, tmp_path / "merged2")
    r = _run("diff", tmp_path / "merged", tmp_path / "merged2")
    assert r.exit_code == 0, r.output

    # extract: embedding and head come back as modules_to_save with the new rows; merging back reproduces
    r = _run("extract", tmp_path / "merged", "--base", base, "-o", tmp_path / "ex", "--rank", "4", "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert {"lm_head", "model.language_model.embed_tokens"} <= set(rep["config"]["modules_to_save"])
    assert "tokenizer.json" in rep["copied"] and any("resized from 256 to 300" in n for n in rep["notes"])
    merge(tmp_path / "ex", base, tmp_path / "back")
    check_reproduces(pm, tmp_path / "back", GROWN)


@pytest.mark.parametrize("fixture", ["qwen25_vl_base", "qwen3_vl_base", "qwen3_vl_tied_base"])
def test_other_families_merge_a_grown_vocab(fixture, request, tmp_path):
    model, base = request.getfixturevalue(fixture)
    pm = train(resized(model, GROWN), CASES["lora-embed+lora-head"], tmp_path / "adapter")
    merge(tmp_path / "adapter", base, tmp_path / "out")
    cfg = check_reproduces(pm, tmp_path / "out", GROWN)
    assert cfg["text_config"]["vocab_size"] == GROWN
