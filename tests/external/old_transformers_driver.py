"""The old-transformers flow, run *inside* an old-transformers venv by ``test_old_transformers.py``.

    python old_transformers_driver.py WORKDIR

With the checkout on PYTHONPATH (not installed): every built-in recipe through ``apply_recipe`` on a tiny model
of its family (families this transformers lacks are listed as unavailable); then, on the tiny Qwen2-VL,
``QvlSaveCallback`` in a few HF ``Trainer`` steps, the tiny demo (``run_training`` on
``recipes/tiny-qwen2-vl.yaml`` with a small step count), ``run_training`` on a local model dir (the demo's base),
``recipes check`` against the real wrap, tied token rows saved and merged, and the ``qvl-ckpt`` commands on the
demo's outputs
through the real click CLI (in-process): inspect, audit, merge (the merged model must reproduce the
PeftModel's logits), convert (adapter -> .pth -> adapter, bit-exact), diff (adapter vs merged by effect),
extract (merged - base back to an adapter that PEFT loads and that reproduces the merged logits).

Each step is recorded as ``{"ok": bool, ...details, "error": traceback tail}``; a failing step does not stop
the later independent ones. The last stdout line is ``QVL-VERDICT {json}``.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TINY_YAML = ROOT / "recipes" / "tiny-qwen2-vl.yaml"
MARKER = "QVL-VERDICT "
TOL = 1e-3  # max abs logit difference (fp32, tiny model): the demo's own bar

verdict: dict = {"steps": {}}


def step(name: str):
    """Run the decorated function now; record its dict result (or the error) under ``name``."""

    def run(fn):
        start = time.perf_counter()
        try:
            out = fn() or {}
            verdict["steps"][name] = {"ok": bool(out.pop("ok", True)), **out}
        except BaseException as e:  # noqa: BLE001 - SystemExit from click included: record, go on
            if isinstance(e, KeyboardInterrupt):
                raise
            verdict["steps"][name] = {"ok": False, "error": "".join(traceback.format_exception(e))[-2500:]}
        verdict["steps"][name]["seconds"] = round(time.perf_counter() - start, 2)
        return fn

    return run


def cli(*args: str) -> tuple[int, str]:
    """``qvl-ckpt ARGS`` through click, in this process: (exit code, output)."""
    from click.testing import CliRunner

    from qvl_plugin.cli import main

    result = CliRunner().invoke(main, list(args), catch_exceptions=True)
    out = result.output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        out += "".join(traceback.format_exception(result.exception))
    return result.exit_code, out


def cli_json(*args: str) -> tuple[int, dict]:
    code, out = cli(*args, "--json")
    try:
        return code, json.loads(out[out.index("{"):])
    except ValueError:
        raise AssertionError(f"qvl-ckpt {' '.join(args)} --json: exit {code}, not JSON:\n{out[-2000:]}") from None


def install_metadata(work: Path) -> Path:
    """The checkout is on PYTHONPATH, not installed: give it the metadata an install would (a dist-info with
    pyproject's entry points, so the built-in recipes register the normal way), first on sys.path."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    meta = work / "site" / f"qvl_plugin-{project['version']}.dist-info"
    meta.mkdir(parents=True, exist_ok=True)
    (meta / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    lines = []
    for group, eps in {"console_scripts": project.get("scripts", {}), **project.get("entry-points", {})}.items():
        lines += [f"[{group}]", *(f"{k} = {v}" for k, v in eps.items()), ""]
    (meta / "entry_points.txt").write_text("\n".join(lines))
    sys.path.insert(0, str(meta.parent))
    return meta


def load_image_text(path: Path):
    import torch
    from transformers import AutoModelForImageTextToText

    from qvl_plugin.compat import dtype_kwarg  # dtype= (>= 4.56) or torch_dtype=

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForImageTextToText.from_pretrained(str(path), **dtype_kwarg(torch.float32), local_files_only=True,
                                                            trust_remote_code=False)
    return model.eval()


def peft_logits(base: Path, adapter: Path, batch: dict):
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_image_text(base), str(adapter)).eval()
    return logits(model, batch)


def logits(model, batch: dict):
    import torch

    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()


def max_diff(a, b) -> float:
    return float((a - b).abs().max())


def main(work: Path) -> int:
    t0 = time.perf_counter()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    import peft
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    verdict.update(transformers=transformers.__version__, peft=peft.__version__, torch=torch.__version__,
                   python=sys.version.split()[0])

    install_metadata(work)
    from qvl_plugin.hosts.data import QwenVLCollator, SyntheticCaptions
    from qvl_plugin.hosts.tiny import build_tiny_model, load_processor
    from qvl_plugin.recipes import apply_recipe, get_recipe, list_recipes

    shared: dict = {}

    @step("setup")
    def _setup():  # the tiny processor and one fixed batch: everything below needs them
        shared["collator"] = QwenVLCollator(load_processor())
        shared["batch"] = shared["collator"]([SyntheticCaptions(2, seed=3)[i] for i in range(2)])

    if not verdict["steps"]["setup"]["ok"]:
        return finish(t0)
    collator, batch = shared["collator"], shared["batch"]

    @step("recipes")
    def _recipes():  # every built-in recipe on a tiny model of its family, where this transformers has the family
        from qvl_plugin.recipes.apply import trainable_report
        from tests.factories import build_model, text_inputs

        out, failed, unavailable = {}, {}, {}
        for info in list_recipes():
            recipe = get_recipe(info.name)
            if recipe.trainable_tokens is not None:
                recipe = recipe.with_overrides(trainable_tokens=[5, 7])
            try:
                model = build_tiny_model(0) if info.family == "qwen2-vl" else build_model(info.family)
            except ImportError as e:  # e.g. Qwen3-VL: transformers >= 4.57
                unavailable[info.family] = f"{type(e).__name__}: {e}"[:300]
                continue
            try:
                pm = apply_recipe(model, recipe)
                out[recipe.name] = {row.group: row.trainable for row in trainable_report(pm) if row.trainable}
                logits(pm, batch if info.family == "qwen2-vl" else text_inputs())  # the wrapped model runs
            except Exception as e:  # noqa: BLE001
                failed[recipe.name] = f"{type(e).__name__}: {e}"[:800]
        return {"ok": bool(out) and not failed, "trainable": out, "failed": failed, "unavailable": unavailable}

    @step("callback")
    def _callback():
        from transformers import Trainer, TrainingArguments

        from qvl_plugin.hosts import QvlSaveCallback

        recipe = get_recipe("qwen2-vl/lora-embed-head").with_overrides(r=4, lora_alpha=8, save=("adapter", "pth"))
        model = apply_recipe(build_tiny_model(0), recipe)
        out = work / "callback"
        args = TrainingArguments(output_dir=str(out), max_steps=2, save_strategy="steps", save_steps=1,
                                 per_device_train_batch_size=1, report_to="none", use_cpu=True, disable_tqdm=True,
                                 remove_unused_columns=False, dataloader_pin_memory=False, logging_steps=1)
        callback = QvlSaveCallback(recipe)
        Trainer(model=model, args=args, train_dataset=SyntheticCaptions(4), data_collator=collator,
                callbacks=[callback]).train()
        trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        problems = []
        for d in (out / "checkpoint-1", out / "checkpoint-2", out):
            if not (d / "adapter" / "adapter_model.safetensors").is_file():
                problems.append(f"{d.name}: no adapter")
            dump = torch.load(d / "adapter.pth", weights_only=True, map_location="cpu")
            if set(dump) != set(trainable) or not all(t.numel() for t in dump.values()):
                problems.append(f"{d.name}: dump keys differ ({len(dump)} vs {len(trainable)} trainable)")
        final = torch.load(out / "adapter.pth", weights_only=True, map_location="cpu")
        if not all(torch.equal(final[k], trainable[k]) for k in final if k in trainable):
            problems.append("final dump differs from the live parameters")
        return {"ok": not problems, "problems": problems, "tensors": len(trainable)}

    demo = work / "demo"

    @step("demo")
    def _demo():
        from qvl_plugin.hosts.runner import load_train_config, run_training

        config = load_train_config(TINY_YAML, training_args={"max_steps": 4, "per_device_train_batch_size": 2})
        r = run_training(config, output_dir=demo)
        ok = (r.max_abs_diff is not None and r.max_abs_diff < TOL and r.dump_unexpected == 0 and r.merged is not None
              and r.steps == 4 and r.last_loss is not None)
        return {"ok": ok, "steps": r.steps, "first_loss": r.first_loss, "last_loss": r.last_loss,
                "max_abs_diff": r.max_abs_diff, "dump_unexpected": r.dump_unexpected,
                "saved": [p.name for p in (r.base, r.adapter, r.pth, r.merged) if p is not None]}

    base, adapter = demo / "base", demo / "adapter"

    @step("user-model")
    def _user_model():  # qvl-train on a local model dir (from_pretrained + its own processor files), 2 steps
        from qvl_plugin.hosts.runner import load_train_config, run_training

        config = load_train_config({
            "recipe": "qwen2-vl/lora", "overrides": {"r": 4, "lora_alpha": 8, "save": ["adapter", "merged"]},
            "model": str(base), "model_kwargs": {"torch_dtype": "float32"}, "synthetic_size": 8, "verify": True,
            "training_args": {"max_steps": 2, "per_device_train_batch_size": 2},
        })
        r = run_training(config, output_dir=work / "user-model")
        return {"ok": r.steps == 2 and r.max_abs_diff is not None and r.max_abs_diff < TOL, "steps": r.steps,
                "max_abs_diff": r.max_abs_diff}

    @step("recipes-check")
    def _recipes_check():  # the dry run on the meta device agrees with the real wrap
        from qvl_plugin.recipes.apply import trainable_report

        name = "qwen2-vl/lora-embed-head"
        code, rep = cli_json("recipes", "check", name, "--model", str(base))
        real = sum(r.trainable for r in trainable_report(apply_recipe(build_tiny_model(0), get_recipe(name))))
        return {"ok": code == 0 and rep.get("trainable") == real, "exit": code, "trainable": rep.get("trainable"),
                "applied": real}

    @step("new-tokens")
    def _new_tokens():  # tied='tie' token rows on the tied tiny model: saved, merged, reloaded
        from qvl_plugin.hosts.saving import save_outputs

        recipe = get_recipe("qwen2-vl/lora-new-tokens").with_overrides(trainable_tokens=[5, 7], r=4, lora_alpha=8)
        pm = apply_recipe(build_tiny_model(0), recipe)
        with torch.no_grad():  # "training": move every trainable tensor
            for p in pm.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.05)
        saved = save_outputs(pm, work / "new-tokens", ("adapter", "merged"), base_path=base)
        ref = logits(pm.eval(), batch)
        merged = max_diff(logits(load_image_text(saved.merged), batch), ref)
        reloaded = max_diff(peft_logits(base, saved.adapter, batch), ref)
        return {"ok": merged < TOL and reloaded < TOL, "merged_vs_live": merged, "reloaded_vs_live": reloaded,
                "trainable_token_indices": pm.peft_config["default"].trainable_token_indices}

    @step("inspect")
    def _inspect():
        code, info = cli_json("inspect", str(adapter))
        lora = info.get("lora") or {}
        ok = code == 0 and info.get("format") == "peft" and info.get("layout") == "qwen2-vl" and lora.get("rank") == 8
        return {"ok": ok, "exit": code, "format": info.get("format"), "layout": info.get("layout"),
                "rank": lora.get("rank"), "modules_to_save": info.get("modules_to_save")}

    @step("audit")
    def _audit():
        code, rep = cli_json("audit", str(adapter), "--base", str(base))
        bad = [f for f in rep.get("findings", []) if f.get("severity") == "error"]
        code_m, rep_m = cli_json("audit", str(demo / "merged"))
        bad_m = [f for f in rep_m.get("findings", []) if f.get("severity") == "error"]
        return {"ok": code == 0 and rep.get("ok") is True and not bad and code_m == 0 and not bad_m,
                "exit": [code, code_m], "findings": [f.get("code") for f in rep.get("findings", []) + rep_m.get("findings", [])],
                "problems": [f.get("message") for f in bad + bad_m]}

    @step("merge")
    def _merge():
        out = work / "merged-cli"
        code, text = cli("merge", str(adapter), "--base", str(base), "-o", str(out))
        if code != 0:
            return {"ok": False, "exit": code, "output": text[-2000:]}
        ref = peft_logits(base, adapter, batch)
        diff = max_diff(logits(load_image_text(out), batch), ref)
        moved = max_diff(logits(load_image_text(base), batch), ref)  # the adapter must change something
        cfg = json.loads((out / "config.json").read_text())
        tied = cfg.get("tie_word_embeddings", (cfg.get("text_config") or {}).get("tie_word_embeddings"))
        return {"ok": diff < TOL and moved > 10 * TOL and not tied, "max_abs_diff": diff, "base_vs_adapter": moved,
                "tie_word_embeddings": tied}

    @step("convert")
    def _convert():
        from safetensors.torch import load_file

        pth, back = work / "convert" / "adapter.pth", work / "convert" / "adapter"
        code1, r1 = cli_json("convert", str(adapter), "--to", "pth", "-o", str(pth), "--base", str(base))
        code2, r2 = cli_json("convert", str(pth), "--to", "peft", "-o", str(back),
                             "--adapter-config", str(adapter / "adapter_config.json"), "--base", str(base))
        a = load_file(str(adapter / "adapter_model.safetensors"))
        b = load_file(str(back / "adapter_model.safetensors")) if (back / "adapter_model.safetensors").is_file() else {}
        exact = set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
        load = r1.get("load") or {}
        clean_load = not load.get("unexpected") and not load.get("missing_adapter") and "skipped" not in load
        diff = max_diff(peft_logits(base, back, batch), peft_logits(base, adapter, batch)) if exact else None
        return {"ok": code1 == 0 and code2 == 0 and exact and clean_load and diff == 0.0, "exit": [code1, code2],
                "bit_exact": exact, "load_check": load, "max_abs_diff": diff}

    @step("diff")
    def _diff():
        code, rep = cli_json("diff", str(adapter), str(demo / "merged"), "--base", str(base), "--atol", "1e-5")
        code_self, _ = cli_json("diff", str(adapter), str(adapter))
        code_base, _ = cli_json("diff", str(base), str(demo / "merged"))  # the merge changed weights: exit 1
        return {"ok": code == 0 and code_self == 0 and code_base == 1, "exit": [code, code_self, code_base],
                "mode": rep.get("mode"), "equal": rep.get("equal"), "counts": rep.get("counts")}

    @step("extract")
    def _extract():
        out = work / "extracted"
        code, rep = cli_json("extract", str(demo / "merged"), "--base", str(base), "-o", str(out), "--rank", "auto",
                             "--energy", "0.999999")
        if code != 0:
            return {"ok": False, "exit": code, "report": rep}
        ref = logits(load_image_text(demo / "merged"), batch)
        diff = max_diff(peft_logits(base, out, batch), ref)
        return {"ok": diff < TOL, "exit": code, "max_rel_error": rep.get("max_rel_error"), "max_abs_diff": diff}

    return finish(t0)


def finish(t0: float) -> int:
    verdict["ok"] = all(s["ok"] for s in verdict["steps"].values())
    verdict["seconds"] = round(time.perf_counter() - t0, 1)
    print(MARKER + json.dumps(verdict, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
