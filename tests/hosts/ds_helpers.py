"""Test-only Trainer callback for the DeepSpeed runs (imported by qvl-train through ``callbacks:``)."""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback

PLAIN_DIR = "peft-plain"


class PlainPeftSave(TrainerCallback):
    """What most scripts do at the end: PEFT's own ``save_pretrained`` on the (partitioned) model, no gather."""

    def on_train_end(self, args, state, control, model=None, **kwargs):
        model.save_pretrained(str(Path(args.output_dir) / PLAIN_DIR), is_main_process=state.is_world_process_zero)


def plain_peft_save() -> PlainPeftSave:
    return PlainPeftSave()
