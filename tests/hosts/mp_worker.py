"""A plain training loop (no Trainer) used by test_multiprocess.py, in one process or under torchrun.

    python mp_worker.py single OUT          # one process, both samples of a step accumulated
    torchrun --nproc_per_node 2 mp_worker.py fsdp2,fsdp1 OUT   # FSDP2 (fully_shard) then FSDP1
                                                              # (use_orig_params) on CPU/gloo, into OUT/<mode>
    torchrun --nproc_per_node 2 mp_worker.py ds-accelerate OUT  # accelerate + DeepSpeed ZeRO-3 plugin

Every mode does the same math: per step, the mean of the two samples' losses (FSDP averages the ranks'
gradients), SGD, the same tiny model from the same seed, LoRA dropout 0. It then calls
``save_outputs`` on every rank, which must gather the shards and write full tensors on rank 0 only.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

STEPS = 3
LR = 0.5  # SGD: linear in the gradients, so float-order noise stays at rounding level (Adam amplifies it)


def build():
    import torch

    from qvl_plugin.hosts.data import QwenVLCollator, SyntheticCaptions
    from qvl_plugin.hosts.tiny import build_tiny_model, load_processor
    from qvl_plugin.recipes import apply_recipe, get_recipe

    recipe = get_recipe("qwen2-vl/lora-embed-head").with_overrides(r=4, lora_alpha=8, lora_dropout=0.0)
    base = build_tiny_model(0)
    torch.manual_seed(0)  # PEFT draws lora_A from the global RNG; FSDP2 does not broadcast rank 0's init
    model = apply_recipe(base, recipe)
    data = SyntheticCaptions(2 * STEPS, seed=0)
    collate = QwenVLCollator(load_processor())
    batches = [[collate([data[2 * s]]), collate([data[2 * s + 1]])] for s in range(STEPS)]
    return model, batches


def train(model, batches, rank: int | None) -> list[float]:
    import torch

    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    losses = []
    for pair in batches:
        mine = pair if rank is None else [pair[rank]]
        total = 0.0
        for batch in mine:
            loss = model(**batch).loss / len(mine)
            loss.backward()
            total += loss.item()
        opt.step()
        opt.zero_grad()
        losses.append(total)
    return losses


def main(mode: str, out: str) -> None:
    import torch

    from qvl_plugin.hosts.saving import save_outputs

    out_dir = Path(out)
    if mode == "single":
        model, batches = build()
        train(model, batches, None)
        save_outputs(model, out_dir, ("pth", "adapter"))
        return

    if mode == "ds-accelerate":
        return ds_accelerate(out_dir)

    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for one in mode.split(","):  # several strategies in one launch: process start-up dominates the cost
        model, batches = build()
        if one == "fsdp2":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (dist.get_world_size(),))
            for layer in model.base_model.model.model.language_model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            wrapped = model
        elif one == "fsdp1":
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            wrapped = FSDP(model, use_orig_params=True, device_id=torch.device("cpu"))
        else:
            raise SystemExit(f"unknown mode {one}")
        train(wrapped, batches, rank)
        # What a naive `named_parameters()` dump would have written from this rank.
        local = {n: list(p.to_local().shape) if hasattr(p, "to_local") else list(p.shape)
                 for n, p in wrapped.named_parameters() if p.requires_grad}
        save_outputs(wrapped, out_dir / one, ("pth", "adapter"))
        (out_dir / one / f"local_shapes.{rank}.json").write_text(json.dumps(local))
        dist.barrier()
    dist.destroy_process_group()


# gradient_clipping stated: accelerate's DeepSpeedPlugin otherwise fills in 1.0 (the 1-process loop has none)
ZERO3 = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "zero_allow_untested_optimizer": True,
         "gradient_clipping": 0.0,
         "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}


def ds_accelerate(out_dir: Path) -> None:
    """A plain accelerate loop with a DeepSpeed ZeRO-3 plugin; ``save_outputs`` on every rank."""
    import deepspeed
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin

    from qvl_plugin.hosts.saving import save_outputs

    deepspeed.init_distributed("gloo", auto_mpi_discovery=False)
    model, batches = build()  # before the plugin exists: the direct constructor cannot run under zero.Init
    rank = torch.distributed.get_rank()
    acc = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=dict(ZERO3)))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    engine, opt = acc.prepare(model, opt)
    for pair in batches:
        loss = engine(**pair[rank]).loss
        acc.backward(loss)
        opt.step()
        opt.zero_grad()
    local = {n: list(p.shape) for n, p in engine.named_parameters() if p.requires_grad}
    save_outputs(engine, out_dir / "ds-accelerate", ("pth", "adapter"))
    (out_dir / "ds-accelerate" / f"local_shapes.{rank}.json").write_text(json.dumps(local))
    torch.distributed.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
