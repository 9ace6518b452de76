"""``qvl-ckpt recover`` on hostile and broken DeepSpeed shard dirs: one error line, exit 1, nothing written,
no code run. (The real 2-process ZeRO-2/3 runs are in tests/hosts/test_deepspeed.py.)"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from qvl_plugin.ckpt.recover import load_zero_state_dict, recover
from qvl_plugin.cli import main
from qvl_plugin.errors import CheckpointError


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _model_states(extra=None) -> dict:
    return {"module": OrderedDict(), "buffer_names": [], "shared_params": {}, "ds_version": "0.19.8",
            "param_shapes": [OrderedDict([("base_model.model.x.lora_A.default.weight", torch.Size([2, 3]))])],
            **(extra or {})}


def _optim(rank: int) -> dict:
    return {"optimizer_state_dict": {"zero_stage": 3, "partition_count": 2,
                                     "fp32_flat_groups": [torch.arange(3, dtype=torch.float32) + 3 * rank]}}


def _shards(root: Path, model_extra=None, optim_extra=None) -> Path:
    step = root / "checkpoint-1" / "global_step1"
    step.mkdir(parents=True)
    (root / "checkpoint-1" / "latest").write_text("global_step1")
    for r in (0, 1):
        torch.save(_model_states(model_extra), step / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt")
        optim = _optim(r)
        optim["optimizer_state_dict"].update(optim_extra or {})
        torch.save(optim, step / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
    return step


def test_synthetic_zero3_layout_is_rebuilt(tmp_path):
    _shards(tmp_path / "run")
    tensors, stage, world = load_zero_state_dict(tmp_path / "run" / "checkpoint-1" / "global_step1")
    assert (stage, world) == (3, 2)
    assert torch.equal(tensors["base_model.model.x.lora_A.default.weight"], torch.arange(6.0).view(2, 3))
    recover(tmp_path / "run", tmp_path / "out.pth", to="pth")
    assert torch.equal(torch.load(tmp_path / "out.pth", weights_only=True)["base_model.model.x.lora_A.default.weight"],
                       torch.arange(6.0).view(2, 3))


@pytest.mark.parametrize("where", ["model", "optim"])
def test_hostile_pickle_is_refused_and_never_run(tmp_path, where):
    marker = tmp_path / "pwned"
    payload = {"evil": _Payload(marker)}
    _shards(tmp_path / "run", model_extra=payload if where == "model" else None,
            optim_extra=payload if where == "optim" else None)
    out = tmp_path / "rec"
    res = CliRunner().invoke(main, ["recover", str(tmp_path / "run"), "-o", str(out)])
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "refused" in lines[0], res.output
    assert not marker.exists() and not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_other_deepspeed_classes_are_not_on_the_allow_list(tmp_path):
    import zipfile

    step = _shards(tmp_path)
    f = step / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    with zipfile.ZipFile(f) as z:
        name = next(n for n in z.namelist() if n.endswith("data.pkl"))
        members = {n: z.read(n) for n in z.namelist()}
    # a GLOBAL naming a DeepSpeed class that is not allow-listed, spliced into a valid torch zip
    members[name] = b"\x80\x02cdeepspeed.runtime.engine\nDeepSpeedEngine\n)\x81." + b""
    with zipfile.ZipFile(f, "w") as z:
        for n, data in members.items():
            z.writestr(n, data)
    with pytest.raises(CheckpointError, match="refused"):
        load_zero_state_dict(step)


def test_missing_rank_and_no_shards(tmp_path):
    step = _shards(tmp_path)
    (step / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(CheckpointError, match="2 ranks but 1"):
        load_zero_state_dict(step)
    res = CliRunner().invoke(main, ["recover", str(tmp_path / "checkpoint-1" / "global_step1" / ".."), "-o", str(tmp_path / "o")])
    assert res.exit_code == 1 and res.output.startswith("error: ")
    empty = tmp_path / "empty"
    empty.mkdir()
    res = CliRunner().invoke(main, ["recover", str(empty), "-o", str(tmp_path / "o2")])
    assert res.exit_code == 1 and "no DeepSpeed shards" in res.output


def test_peft_output_needs_alpha(tmp_path):
    _shards(tmp_path / "run")
    res = CliRunner().invoke(main, ["recover", str(tmp_path / "run"), "-o", str(tmp_path / "adapter")])
    assert res.exit_code == 1 and "alpha is never guessed" in res.output
    assert not (tmp_path / "adapter").exists()
