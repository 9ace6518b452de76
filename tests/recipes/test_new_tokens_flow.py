"""The new-tokens flow end to end, as a user runs it: add tokens to the tiny Qwen2-VL's real tokenizer,
``resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)``, apply ``qwen2-vl/lora-new-tokens``, train a
few HF Trainer steps with :class:`QvlSaveCallback`, merge onto the ORIGINAL base and reload it unchanged."""

from __future__ import annotations

import json
import warnings

import torch
from click.testing import CliRunner
from transformers import AutoModelForImageTextToText, AutoTokenizer, Trainer, TrainingArguments

from qvl_plugin import QvlSaveCallback, apply_recipe, get_recipe
from qvl_plugin.ckpt.merge import merge
from qvl_plugin.cli import main
from qvl_plugin.hosts.tiny import build_tiny_model, load_processor, save_base

NEW = [f"<obj{i}>" for i in range(140)]  # the tiny tokenizer has 384 ids, the model 512 rows: 524 needs a grow


class _Texts(torch.utils.data.Dataset):
    """Sentences that use the new tokens (labels = inputs)."""

    def __init__(self, ids: list[int], n: int = 8, length: int = 12):
        g = torch.Generator().manual_seed(0)
        self.rows = []
        for i in range(n):
            row = torch.randint(3, 300, (length,), generator=g)
            row[[2, 6, 9]] = torch.tensor([ids[i % len(ids)], ids[(i + 1) % len(ids)], ids[(i + 2) % len(ids)]])
            self.rows.append(row)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.rows[i], "attention_mask": torch.ones_like(self.rows[i]), "labels": self.rows[i]}


def test_lora_new_tokens_trains_saves_merges_onto_the_original_base_and_reloads(tmp_path):
    model = build_tiny_model(seed=0)
    processor = load_processor()
    base = save_base(model, processor, tmp_path / "base")
    tok = processor.tokenizer
    tok.add_tokens(NEW)
    model.resize_token_embeddings(len(tok), pad_to_multiple_of=64, mean_resizing=False)
    rows = model.get_input_embeddings().weight.shape[0]
    assert (len(tok), rows) == (524, 576)
    new_ids = tok.convert_tokens_to_ids(NEW[:6])
    before = model.get_input_embeddings().weight.detach().clone()

    recipe = get_recipe("qwen2-vl/lora-new-tokens").with_overrides(trainable_tokens=new_ids, r=4, lora_alpha=8)
    pm = apply_recipe(model, recipe)
    out = tmp_path / "run"
    args = TrainingArguments(output_dir=str(out), max_steps=3, save_strategy="steps", save_steps=3, learning_rate=5e-2,
                             per_device_train_batch_size=2, report_to="none", use_cpu=True, disable_tqdm=True,
                             remove_unused_columns=False, dataloader_pin_memory=False, logging_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Trainer(model=pm, args=args, train_dataset=_Texts(new_ids), processing_class=tok,
                callbacks=[QvlSaveCallback(recipe, base_path=base)]).train()
    pm.eval()
    ckpt = out / "checkpoint-3"
    assert len(AutoTokenizer.from_pretrained(str(ckpt))) == 524  # the Trainer saved the grown tokenizer there

    # the Trainer's own adapter (PEFT "auto") lacks the resized rows: refused, naming the fix
    r = CliRunner().invoke(main, ["merge", str(ckpt), "--base", str(base), "-o", str(tmp_path / "bad")])
    assert r.exit_code == 1 and "save_embedding_layers=True" in r.stderr and not (tmp_path / "bad").exists()

    # the callback's adapter carries them; its tokenizer is the checkpoint dir's
    report = merge(ckpt / "adapter", base, tmp_path / "merged")
    assert any("grown from 512 to 576" in n for n in report.notes)
    assert any(f"tokenizer files from {ckpt}" in n for n in report.notes)
    cfg = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert cfg["text_config"]["vocab_size"] == 576 and cfg["vocab_size"] == 576

    merged = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
    assert len(AutoTokenizer.from_pretrained(str(tmp_path / "merged"))) == 524
    ids = torch.tensor([[5, new_ids[0], 17, new_ids[3], 523, 575, 40, 41]])
    with torch.no_grad():
        want = pm(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    assert got.shape[-1] == 576 and (got - want).abs().max().item() < 1e-4
    # training moved the new rows away from their initialisation, and the untrained padding rows came along
    emb = merged.get_input_embeddings().weight.detach()
    assert not torch.allclose(emb[new_ids], before[new_ids]) and torch.equal(emb[560:], before[560:])

    r = CliRunner().invoke(main, ["audit", str(ckpt / "adapter"), "--base", str(base), "--json"])
    assert r.exit_code == 0, r.output
    rv = next(f for f in json.loads(r.stdout)["findings"] if f["code"] == "resized-vocab")
    assert "from 512 to 576" in rv["message"] and "fit" in rv["message"]
