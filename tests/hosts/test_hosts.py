"""The documented host-trainer usages, each a few steps on the tiny model: HF Trainer + QvlSaveCallback at
checkpoints, a plain accelerate loop + save_outputs, TRL's SFTTrainer + QvlSaveCallback."""

from __future__ import annotations

import math

import pytest
import torch

from qvl_plugin.hosts.saving import DUMP_FILE


@pytest.fixture
def recipe():
    from qvl_plugin.recipes import get_recipe

    return get_recipe("qwen2-vl/lora-embed-head").with_overrides(r=4, lora_alpha=8, save=("adapter", "pth"))


def _model(recipe):
    from qvl_plugin.hosts.tiny import build_tiny_model
    from qvl_plugin.recipes import apply_recipe

    return apply_recipe(build_tiny_model(0), recipe)


def _check_dump(path, model):
    dump = torch.load(path, weights_only=True, mmap=True, map_location="cpu")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(dump) == trainable and all(t.numel() for t in dump.values())
    return dump


def test_trainer_callback_saves_at_checkpoints_and_end(recipe, tiny_processor, tmp_path):
    from transformers import Trainer, TrainingArguments

    from qvl_plugin.hosts import QvlSaveCallback
    from qvl_plugin.hosts.data import QwenVLCollator, SyntheticCaptions

    model = _model(recipe)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, save_strategy="steps", save_steps=1,
                             per_device_train_batch_size=1, report_to="none", use_cpu=True, disable_tqdm=True,
                             remove_unused_columns=False, dataloader_pin_memory=False, logging_steps=1)
    callback = QvlSaveCallback(recipe)
    Trainer(model=model, args=args, train_dataset=SyntheticCaptions(4), data_collator=QwenVLCollator(tiny_processor),
            callbacks=[callback]).train()
    for ckpt in ("checkpoint-1", "checkpoint-2"):
        assert (tmp_path / ckpt / "adapter" / "adapter_model.safetensors").is_file()
        _check_dump(tmp_path / ckpt / DUMP_FILE, model)
    final = _check_dump(tmp_path / DUMP_FILE, model)
    live = dict(model.named_parameters())
    assert all(torch.equal(final[k], live[k].detach()) for k in final)
    assert callback.final.adapter == tmp_path / "adapter"


def test_plain_accelerate_loop(recipe, tiny_processor, tmp_path):
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from qvl_plugin.hosts import save_outputs
    from qvl_plugin.hosts.data import QwenVLCollator, SyntheticCaptions

    accelerator = Accelerator(cpu=True)
    model = _model(recipe)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loader = DataLoader(SyntheticCaptions(4), batch_size=2, collate_fn=QwenVLCollator(tiny_processor))
    model, opt, loader = accelerator.prepare(model, opt, loader)
    losses = []
    for batch in loader:
        loss = model(**batch).loss
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    saved = save_outputs(model, tmp_path, recipe.save)  # on every process; rank 0 writes
    assert all(math.isfinite(x) for x in losses)
    _check_dump(saved.pth, accelerator.unwrap_model(model))
    assert (saved.adapter / "adapter_config.json").is_file()


def test_trl_sft_trainer(recipe, tiny_processor, tmp_path):
    import datasets
    from trl import SFTConfig, SFTTrainer

    from qvl_plugin.hosts import QvlSaveCallback
    from qvl_plugin.hosts.data import QwenVLCollator, SyntheticCaptions

    model = _model(recipe)
    synthetic = SyntheticCaptions(4)
    train = datasets.Dataset.from_list([synthetic[i] for i in range(len(synthetic))])  # TRL wants a datasets.Dataset
    args = SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3,
                     report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True, logging_steps=1,
                     remove_unused_columns=False, dataloader_pin_memory=False,
                     dataset_kwargs={"skip_prepare_dataset": True})  # our collator builds the chat + labels
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, data_collator=QwenVLCollator(tiny_processor),
                         processing_class=tiny_processor, callbacks=[QvlSaveCallback(recipe)])
    trainer.train()
    assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)
    _check_dump(tmp_path / DUMP_FILE, model)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
