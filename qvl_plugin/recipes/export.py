"""A recipe written the way each host trainer's users write it by hand (LLaMA-Factory YAML, ms-swift
arguments, an axolotl fragment, a plain PEFT ``LoraConfig``), with every place where it differs.

Hosts select modules by their own rules (LLaMA-Factory by substring minus its frozen keys, PEFT's
``modules_to_save`` by string suffix, ms-swift/axolotl/PEFT ``target_modules`` regexes by fullmatch), so an
export is resolved against a real module list, the user's model or the family's default-size model, and
each host's rule is replayed on it: what the host would train is compared with what ``apply_recipe``
trains. Whatever a host cannot express is a listed difference, never a silently different run.
"""

from __future__ import annotations

import json
import shlex
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from .apply import ModelIndex, RecipePlan, plan_recipe
from .schema import Recipe, RecipeError, close

__all__ = ["HOSTS", "FORMATS", "HostSpec", "HOST_SPECS", "HostExport", "export_recipe", "reference_index", "model_index"]

HOSTS = ("llamafactory", "swift", "axolotl", "peft")
#: output formats per host; the first is the default
FORMATS: dict[str, tuple[str, ...]] = {"llamafactory": ("yaml", "json"), "swift": ("shell", "yaml", "json"),
                                       "axolotl": ("yaml", "json"), "peft": ("json",)}


@dataclass(frozen=True)
class HostSpec:
    """What a host can say beyond plain LoRA targets (read from its argument classes)."""

    title: str
    tokens: bool  # trainable token rows (PEFT trainable_token_indices)
    tie: bool  # PEFT ensure_weight_tying
    params: bool  # PEFT target_parameters (fused MoE experts)
    untie_both: bool  # unties a tied model's config when embedding and head are both trained whole
    int_alpha: bool  # lora_alpha is typed int
    families: tuple[str, ...] = ("qwen-vl", "qwen2-vl", "qwen2.5-vl", "qwen3-vl", "qwen3-vl-moe")


HOST_SPECS: dict[str, HostSpec] = {
    # llamafactory 0.9.5 hparams/finetuning_args.py + model/adapter.py
    "llamafactory": HostSpec("LLaMA-Factory 0.9.5", False, False, False, False, True,
                             ("qwen2-vl", "qwen2.5-vl", "qwen3-vl", "qwen3-vl-moe")),
    # ms-swift 4.6.0 arguments/tuner_args.py + pipelines/train/tuner.py; export --merge_lora unties when both
    # get_input_embeddings() and get_output_embeddings() are ModulesToSaveWrappers
    "swift": HostSpec("ms-swift 4.6.0", False, False, True, True, False),
    # axolotl utils/schemas/peft.py (lora_alpha: int, peft_trainable_token_indices, peft_ensure_weight_tying)
    "axolotl": HostSpec("axolotl", True, True, True, False, True),
    "peft": HostSpec("PEFT", True, True, True, False, False),
}

# LLaMA-Factory 0.9.5 model/model_utils/visual.py: substrings it keeps LoRA off (vision tower and projector
# when frozen, the language model when frozen, conflict keys always).
_QWEN2 = {"vision": ("visual.patch_embed", "visual.blocks"), "projector": ("visual.merger",),
          "language": ("language_model", "lm_head"), "conflict": ("patch_embed",)}
_QWEN3 = dict(_QWEN2, vision=("visual.pos_embed", "visual.patch_embed", "visual.blocks", "visual.deepstack_merger_list"))
_LF_KEYS = {"qwen2-vl": _QWEN2, "qwen2.5-vl": _QWEN2, "qwen3-vl": _QWEN3, "qwen3-vl-moe": _QWEN3}

# transformers' default config per family: the module names of a full-size model, built on the meta device
_DEFAULT_CONFIGS = {"qwen2-vl": "Qwen2VLConfig", "qwen2.5-vl": "Qwen2_5_VLConfig", "qwen3-vl": "Qwen3VLConfig",
                    "qwen3-vl-moe": "Qwen3VLMoeConfig"}


@dataclass(frozen=True)
class HostExport:
    """One host's configuration for a recipe, and how it differs from ``apply_recipe`` (empty = exact)."""

    host: str
    recipe: Recipe
    config: dict[str, Any]
    differences: tuple[str, ...]
    checked_on: str

    @property
    def exact(self) -> bool:
        return not self.differences

    def render(self, fmt: str | None = None) -> str:
        """The text a user of the host writes: YAML/JSON config, or for ms-swift also a shell line."""
        fmt = fmt or FORMATS[self.host][0]
        if fmt not in FORMATS[self.host]:
            raise RecipeError(f"--format {fmt} is not available for {self.host}; choose {', '.join(FORMATS[self.host])}")
        if fmt == "json":
            return json.dumps(self.config, indent=2) + "\n"
        if fmt == "shell":
            return " ".join(["swift", "sft", *(shlex.quote(a) for a in _argv(self.config))]) + "\n"
        import yaml

        head = f"# {HOST_SPECS[self.host].title}: recipe {self.recipe.name}, checked on {self.checked_on}\n"
        return head + yaml.safe_dump(self.config, sort_keys=False, width=100000)


def _argv(config: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for key, value in config.items():
        values = value if isinstance(value, list) else [value]
        out += [f"--{key}", *(str(v).lower() if isinstance(v, bool) else str(v) for v in values)]
    return out


def reference_index(family: str) -> ModelIndex:
    """Module names of the family's default-size model (transformers' default config, meta device)."""
    if family not in _DEFAULT_CONFIGS:
        raise RecipeError(f"{family} has no transformers class to take module names from; pass --model MODEL_DIR")
    import torch
    import transformers

    config = getattr(transformers, _DEFAULT_CONFIGS[family])()
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        return ModelIndex.from_model(transformers.AutoModelForImageTextToText.from_config(config))


def model_index(model_dir: Any) -> ModelIndex:
    """Module names of the model in ``model_dir``: meta-device build from config.json (Qwen-VL v1: its key names)."""
    from pathlib import Path

    from ..layouts import detect_layout
    from .check import build_meta_model, keys_index, read_model_config

    config = read_model_config(Path(model_dir), needed_by="--model")
    layout = detect_layout(config=config)
    if layout.name == "qwen-vl":
        return keys_index(Path(model_dir), layout, config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ModelIndex.from_model(build_meta_model(model_dir))


def _cover(wanted: Iterable[str], names: Iterable[str], hit: Callable[[str, str], bool]) -> tuple[list[str], list[str]]:
    """Shortest dotted suffixes of ``wanted`` whose host-rule hits stay inside ``wanted`` (and who is missed)."""
    want, names = set(wanted), list(names)
    chosen: list[str] = []
    missed: list[str] = []
    covered: set[str] = set()
    for module in wanted:
        if module in covered:
            continue
        parts = module.split(".")
        for i in range(len(parts) - 1, -1, -1):
            cand = ".".join(parts[i:])
            hits = {n for n in names if hit(n, cand)}
            if module in hits and hits <= want:
                chosen.append(cand)
                covered |= hits
                break
        else:
            missed.append(module)
    return chosen, missed


def _suffixes(plan: RecipePlan, host: str, diffs: list[str]) -> list[str]:
    """modules_to_save spelled as PEFT matches them (``name.endswith(entry)``)."""
    chosen, missed = _cover(plan.modules_to_save, plan.index.modules, lambda n, c: n.endswith(c))
    diffs += [f"train_modules: {host} cannot save {m} alone (every suffix also hits other modules)" for m in missed]
    return chosen


def _trained_groups(plan: RecipePlan) -> set[str]:
    return {plan.layout.group(m) for m in (*plan.lora_modules, *plan.modules_to_save, *plan.token_rows)}


def _alpha(plan: RecipePlan, spec: HostSpec, diffs: list[str]) -> int | float:
    alpha = plan.recipe.lora_alpha
    if spec.int_alpha and alpha != int(alpha):
        diffs.append(f"lora_alpha: {spec.title} takes an integer, the recipe has {alpha:g} (would become {int(alpha)})")
    return int(alpha) if spec.int_alpha or alpha == int(alpha) else alpha


def _llamafactory(plan: RecipePlan, diffs: list[str]) -> dict[str, Any]:
    r, keys, groups = plan.recipe, _LF_KEYS[plan.recipe.family], _trained_groups(plan)
    flags = {"freeze_vision_tower": "vision" not in groups, "freeze_multi_modal_projector": "merger" not in groups,
             "freeze_language_model": "language" in r.freeze}
    forbidden = [*keys["conflict"], *(k for f, g in (("freeze_vision_tower", "vision"), ("freeze_multi_modal_projector", "projector"),
                                                     ("freeze_language_model", "language")) if flags[f] for k in keys[g])]
    targets, missed = _cover(plan.lora_modules, plan.index.modules,
                             lambda n, c: c in n and not any(f in n for f in forbidden))
    diffs += [f"targets: LLaMA-Factory never puts LoRA on {m} (its lora_target skips names containing "
              f"{', '.join(f for f in forbidden if f in m)})" for m in missed]
    if not targets:
        diffs.append("targets: LLaMA-Factory needs at least one LoRA target module (lora_target)")
    config: dict[str, Any] = {"finetuning_type": "lora", "lora_target": ",".join(targets) or "all"}
    saved = _suffixes(plan, "LLaMA-Factory", diffs)
    if saved:
        config["additional_target"] = ",".join(saved)
    config.update(freeze_vision_tower=flags["freeze_vision_tower"],
                  freeze_multi_modal_projector=flags["freeze_multi_modal_projector"])
    if flags["freeze_language_model"]:
        config["freeze_language_model"] = True
    config.update(lora_rank=r.r, lora_alpha=_alpha(plan, HOST_SPECS["llamafactory"], diffs), lora_dropout=r.lora_dropout,
                  use_rslora=r.use_rslora, use_dora=r.use_dora)
    return config


def _swift(plan: RecipePlan, diffs: list[str]) -> dict[str, Any]:
    r, groups = plan.recipe, _trained_groups(plan)
    config: dict[str, Any] = {"tuner_type": "lora"}
    if plan.lora_modules:
        config["target_regex"] = plan.target_regex
    else:  # an empty target list makes ms-swift fall back to all-linear
        diffs.append("targets: ms-swift needs at least one LoRA target module (it falls back to all-linear)")
    if r.target_parameters:
        config["target_parameters"] = list(r.target_parameters)
    saved = _suffixes(plan, "ms-swift", diffs)
    if saved:
        config["modules_to_save"] = saved
    config.update(freeze_llm="language" in r.freeze, freeze_vit="vision" not in groups, freeze_aligner="merger" not in groups,
                  lora_rank=r.r, lora_alpha=_alpha(plan, HOST_SPECS["swift"], diffs), lora_dropout=r.lora_dropout,
                  use_rslora=r.use_rslora, use_dora=r.use_dora)
    return config


def _axolotl(plan: RecipePlan, diffs: list[str]) -> dict[str, Any]:
    r = plan.recipe
    config: dict[str, Any] = {"adapter": "lora", "lora_r": r.r, "lora_alpha": _alpha(plan, HOST_SPECS["axolotl"], diffs),
                              "lora_dropout": r.lora_dropout}
    if plan.lora_modules:
        config["lora_target_modules"] = plan.target_regex
    if r.target_parameters:
        config["lora_target_parameters"] = list(r.target_parameters)
    saved = _suffixes(plan, "axolotl", diffs)
    if saved:
        config["lora_modules_to_save"] = saved
    if plan.token_rows:
        config["peft_trainable_token_indices"] = {m: list(ids) for m, ids in plan.token_rows.items()}
    if plan.ensure_weight_tying:
        config["peft_ensure_weight_tying"] = True
    if r.use_rslora:
        config["peft_use_rslora"] = True
    if r.use_dora:
        config["peft_use_dora"] = True
    return config


def _peft(plan: RecipePlan, diffs: list[str]) -> dict[str, Any]:
    """apply_recipe's own LoraConfig, minus the fields left at PEFT's defaults (what a user writes; other PEFT
    versions accept it): ``LoraConfig(**data)`` or an adapter_config.json."""
    from peft import LoraConfig

    data, defaults = plan.lora_config().to_dict(), LoraConfig().to_dict()
    keep = ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "target_modules")
    out = {}
    for key, value in data.items():
        if isinstance(value, (set, frozenset)):
            value = sorted(value)
        if key in keep or (key not in ("peft_version", "auto_mapping") and value != defaults.get(key)):
            out[key] = getattr(value, "value", value)  # enums (task_type, peft_type) -> their string
    return json.loads(json.dumps(out, default=str))


_BUILDERS: dict[str, Callable[[RecipePlan, list[str]], dict[str, Any]]] = {
    "llamafactory": _llamafactory, "swift": _swift, "axolotl": _axolotl, "peft": _peft}


def _common(plan: RecipePlan, spec: HostSpec) -> list[str]:
    r, diffs = plan.recipe, []
    if plan.token_rows and not spec.tokens:
        diffs.append(f"trainable_tokens: {spec.title} cannot train only some rows ({', '.join(plan.token_rows)}); "
                     "train them whole with train_modules instead")
    if r.target_parameters and not spec.params:
        diffs.append(f"target_parameters: {spec.title} cannot put LoRA on raw parameters ({', '.join(r.target_parameters)})")
    if plan.ensure_weight_tying and not spec.tie:
        diffs.append(f"tied: tie: {spec.title} cannot share one trained copy between the tied embedding and lm_head "
                     "(PEFT ensure_weight_tying); it trains two copies")
    if plan.untie:
        edges = {plan.layout.group(m) for m in plan.modules_to_save}
        if not (spec.untie_both and {"embedding", "head"} <= edges):
            diffs.append(f"tied: untie: {spec.title} keeps the model config tie_word_embeddings=true while the trained "
                         "embedding/lm_head differ; set it to false in the model's config.json before training")
    return diffs


def export_recipe(recipe: Recipe | str, host: str, model: Any = None, *, checked_on: str | None = None) -> HostExport:
    """``recipe`` as ``host``'s configuration, checked on ``model`` (a model, a ModelIndex, or None for the
    family's default-size model); ``differences`` lists everything the host would do otherwise."""
    from .registry import get_recipe

    if host not in HOSTS:
        raise RecipeError(f"unknown host {host!r}{close(str(host), HOSTS)}; known: {', '.join(HOSTS)}")
    recipe = get_recipe(recipe)
    spec = HOST_SPECS[host]
    if recipe.family not in spec.families:
        raise RecipeError(f"{spec.title} does not support {recipe.family} models; hosts for it: "
                          f"{', '.join(h for h in HOSTS if recipe.family in HOST_SPECS[h].families)}")
    if model is None:
        index, where = reference_index(recipe.family), f"transformers' default {recipe.family} config"
    else:
        index = model if isinstance(model, ModelIndex) else ModelIndex.from_model(model)
        where = checked_on or "the given model"
    plan = plan_recipe(index, recipe)
    diffs = _common(plan, spec)
    config = _BUILDERS[host](plan, diffs)
    return HostExport(host, recipe, config, tuple(diffs), checked_on or where)
