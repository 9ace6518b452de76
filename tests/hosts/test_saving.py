"""The gather-aware saver and QvlSaveCallback: never write empty or truncated tensors."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainerControl, TrainerState, TrainingArguments

from qvl_plugin.errors import CheckpointError, QvlError, UsageError
from qvl_plugin.hosts.callback import QvlSaveCallback
from qvl_plugin.hosts.saving import (
    DUMP_FILE,
    EmptyTensorError,
    adapter_key,
    check_tensors,
    gather_trainable_state_dict,
    save_outputs,
    write_pth,
)

EMBED = "base_model.model.model.language_model.embed_tokens.modules_to_save.default.weight"
HEAD = "base_model.model.lm_head.modules_to_save.default.weight"


@pytest.fixture
def recipe():
    from qvl_plugin.recipes import get_recipe

    return get_recipe("qwen2-vl/lora-embed-head").with_overrides(r=4, lora_alpha=8, save=("adapter", "pth"))


@pytest.fixture
def peft_model(recipe):
    from qvl_plugin.hosts.tiny import build_tiny_model
    from qvl_plugin.recipes import apply_recipe

    return apply_recipe(build_tiny_model(0), recipe)


def test_gather_single_process_is_the_trainable_set(peft_model):
    sd = gather_trainable_state_dict(peft_model)
    assert set(sd) == {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert {EMBED, HEAD} <= set(sd)
    p = dict(peft_model.named_parameters())[EMBED]
    assert sd[EMBED].data_ptr() != p.data_ptr()  # copies, not views of live parameters


def test_zero3_style_empty_placeholder_is_refused(peft_model, tmp_path):
    # what a ZeRO-3 / FSDP rank holds for a parameter it does not own: a 0-element tensor
    dict(peft_model.named_parameters())[EMBED].data = torch.empty(0)
    with pytest.raises(EmptyTensorError) as info:
        save_outputs(peft_model, tmp_path / "out", ("adapter", "pth"))
    assert EMBED in str(info.value) and "zero-element" in str(info.value)
    assert not (tmp_path / "out" / DUMP_FILE).exists()
    assert not (tmp_path / "out" / "adapter").exists()


def test_truncated_tensor_is_refused(peft_model):
    # ZeRO-3 records the full shape on the parameter; a partial gather must not pass for the real thing
    dict(peft_model.named_parameters())[HEAD].ds_shape = (1024, 64)
    with pytest.raises(EmptyTensorError, match="shape differs from the full parameter"):
        gather_trainable_state_dict(peft_model)


def test_callback_refuses_empty_tensors(peft_model, recipe, tmp_path):
    dict(peft_model.named_parameters())[HEAD].data = torch.empty(0)
    callback = QvlSaveCallback(recipe)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    with pytest.raises(EmptyTensorError, match="lm_head"):
        callback.on_train_end(args, TrainerState(), TrainerControl(), model=peft_model)
    with pytest.raises(EmptyTensorError):
        callback.on_save(args, TrainerState(global_step=3), TrainerControl(), model=peft_model)
    assert not list(tmp_path.rglob("*.pth"))


def test_write_pth_refuses_empty(tmp_path):
    with pytest.raises(EmptyTensorError, match="a.weight"):
        write_pth({"a.weight": torch.empty(0, 4), "b.weight": torch.ones(2)}, tmp_path / "x.pth")
    assert not (tmp_path / "x.pth").exists()
    assert check_tensors({"b.weight": torch.ones(2)}, {"b.weight": (2,), "c.weight": (3,)}).count("not gathered") == 1
    assert isinstance(EmptyTensorError("x"), CheckpointError)


def test_merged_needs_a_base(recipe, peft_model, tmp_path):
    with pytest.raises(UsageError, match="base_path"):
        QvlSaveCallback(recipe.with_overrides(save=("adapter", "merged")))
    with pytest.raises(QvlError, match="base_path"):
        save_outputs(peft_model, tmp_path, ("merged",))
    with pytest.raises(UsageError, match="unknown save format"):
        save_outputs(peft_model, tmp_path, ("gguf",))


def test_adapter_key_follows_peft():
    assert adapter_key("base_model.model.x.q_proj.lora_A.default.weight") == "base_model.model.x.q_proj.lora_A.weight"
    assert adapter_key(HEAD) == "base_model.model.lm_head.weight"
    assert adapter_key("base_model.model.e.lora_embedding_A.default") == "base_model.model.e.lora_embedding_A"
    assert (adapter_key("base_model.model.e.token_adapter.trainable_tokens_delta.default")
            == "base_model.model.e.token_adapter.trainable_tokens_delta")
    assert adapter_key("base_model.model.q.lora_magnitude_vector.default.weight") == "base_model.model.q.lora_magnitude_vector"


def test_save_outputs_writes_loadable_files(peft_model, tmp_path):
    from peft import PeftModel

    saved = save_outputs(peft_model, tmp_path / "o", ("adapter", "pth"))
    assert saved.pth == tmp_path / "o" / DUMP_FILE and saved.adapter == tmp_path / "o" / "adapter"
    dump = torch.load(saved.pth, weights_only=True, mmap=True, map_location="cpu")
    assert set(dump) == set(saved.keys) and len(dump) == saved.tensors == 30
    # re-saving over our own previous output is allowed and stays atomic
    save_outputs(peft_model, tmp_path / "o", ("adapter", "pth"))
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["adapter", DUMP_FILE]
    from qvl_plugin.hosts.tiny import build_tiny_model

    loaded = PeftModel.from_pretrained(build_tiny_model(1), str(saved.adapter))
    assert torch.equal(dict(loaded.named_parameters())[HEAD], dump[HEAD])
