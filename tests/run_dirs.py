"""Trainer output dirs for the run-dir tests, made by the real HF Trainer on a tiny PEFT model, then laid
out with the exact extra file sets FIELD_NOTES records for each host (LLaMA-Factory 0.9.5, ms-swift 4.6.0).

- ``trainer_run``: ``Trainer(max_steps=N, save_steps=1)``: ``checkpoint-1..N/`` each with the adapter,
  trainer_state.json (written by Trainer), optimizer/scheduler/rng states, training_args.bin.
- ``as_llamafactory``: + the final adapter at the top (Trainer.save_model), trainer_state.json, all_results.json.
- ``as_swift``: + ``last-checkpoint`` symlink, args.json, logging.jsonl, ``checkpoint-N/{args.json,
  additional_config.json}`` and a ``checkpoint-N-merged/`` export.
- ``swift_lora_llm_save``: ms-swift's ``lora_llm`` tuner save, step for step (``LoRALLMTuner.save_pretrained``):
  every trainable parameter handed to PEFT's save_pretrained, the vision ones again to ``vit.safetensors``.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file

__all__ = ["trainer_run", "as_llamafactory", "as_swift", "swift_lora_llm_save"]


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 8, seq: int = 8, vocab: int = 240, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, vocab, (n, seq), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.ids[i]}


def trainer_run(model, lora_config: LoraConfig, out: Path, steps: int = 2):
    """Train ``steps`` steps with the HF Trainer, saving every step; returns the trained PeftModel."""
    from transformers import Trainer, TrainingArguments

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = get_peft_model(copy.deepcopy(model), copy.deepcopy(lora_config))
            args = TrainingArguments(
                output_dir=str(out), max_steps=steps, save_steps=1, save_strategy="steps", per_device_train_batch_size=4,
                learning_rate=5e-2, use_cpu=True, report_to=[], logging_steps=1, disable_tqdm=True, seed=0,
                dataloader_num_workers=0,
            )
            trainer = Trainer(model=pm, args=args, train_dataset=_Tokens())
            trainer.train()
    pm.eval()
    return pm, trainer


def as_llamafactory(trainer, out: Path) -> Path:
    """LLaMA-Factory's run dir: the final adapter and trainer state at the top, next to checkpoint-N/."""
    trainer.save_model(str(out))
    trainer.save_state()
    (out / "all_results.json").write_text(json.dumps({"epoch": 1.0, "train_loss": 1.0}))
    return out


def as_swift(out: Path, pm, base: Path, newest: int) -> Path:
    """ms-swift 4.6.0's extra files around the Trainer's checkpoints, and its merged export of ``newest``."""
    args = {"tuner_type": "lora", "model": str(base), "output_dir": str(out)}
    (out / "args.json").write_text(json.dumps(args))
    (out / "logging.jsonl").write_text(json.dumps({"loss": 1.0, "global_step/max_steps": f"{newest}/{newest}"}) + "\n")
    for ck in out.glob("checkpoint-*"):
        (ck / "args.json").write_text(json.dumps(args))
        (ck / "additional_config.json").write_text(json.dumps({"lora_dtype": None, "lorap_lr_ratio": None}))
    os.symlink(f"checkpoint-{newest}", out / "last-checkpoint")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        copy.deepcopy(pm).merge_and_unload().save_pretrained(out / f"checkpoint-{newest}-merged")
    return out


def swift_lora_llm_save(pm, directory: Path) -> Path:
    """``LoRALLMTuner.save_pretrained``: trainable params -> PEFT save; vision/aligner params -> vit.safetensors."""
    state = {n: p.detach().cpu() for n, p in pm.named_parameters() if p.requires_grad}
    pm.save_pretrained(str(directory), state_dict=state)
    vit = {k: v.contiguous() for k, v in state.items() if ".visual." in k}
    save_file(vit, str(directory / "vit.safetensors"), metadata={"format": "pt"})
    return directory
