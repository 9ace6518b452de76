"""Runs inside the vLLM venv (never the project's): greedy tokens for a batch of models and adapters.

``python vllm_worker.py JOB.json RESULT.json``. JOB: {"engines": [{"model": DIR, "engine": {LLM kwargs},
"runs": [{"name": N, "lora": DIR|null}]}], "text_prompts": [[ids]], "image_prompt": str, "image": PNG,
"new_tokens": K}. One ``LLM`` per engine entry, all in this one process (startup is the slow part on CPU).
RESULT: {"runs": {N: {"text": [[ids]], "image": [[ids]]} | {"error": "Type: message"}}, "vllm": version,
"seconds": {...}}. A refused adapter is recorded, not raised; since vLLM may hang on the next request
after a refusal (FIELD_NOTES), a refusal ends that engine: put refusal probes last, one per engine.
Written after every run, so a timeout still leaves what was measured.
"""

from __future__ import annotations

import gc
import json
import sys
import time


def _save(path: str, result: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    import os

    os.replace(path + ".tmp", path)


def main(job_path: str, out_path: str) -> int:
    t0 = time.time()
    import vllm
    from PIL import Image
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    job = json.load(open(job_path))
    result: dict = {"vllm": vllm.__version__, "runs": {}, "seconds": {"import": round(time.time() - t0, 1)}}
    sp = SamplingParams(temperature=0.0, max_tokens=job["new_tokens"], ignore_eos=True)
    img = Image.open(job["image"]).convert("RGB")
    text = [{"prompt_token_ids": ids} for ids in job["text_prompts"]]
    mm = [{"prompt": job["image_prompt"], "multi_modal_data": {"image": img}}]
    lora_id = 0
    for k, eng in enumerate(job["engines"]):
        t = time.time()
        try:
            llm = LLM(model=eng["model"], **eng["engine"])
        except Exception as e:  # noqa: BLE001 - a model vLLM refuses to load is a verdict too
            for run in eng["runs"]:
                result["runs"][run["name"]] = {"error": f"engine start: {type(e).__name__}: {e}"}
            _save(out_path, result)
            continue
        result["seconds"][f"engine{k}_start"] = round(time.time() - t, 1)
        for run in eng["runs"]:
            t = time.time()
            req = None
            if run.get("lora"):
                lora_id += 1
                req = LoRARequest(run["name"], lora_id, run["lora"])
            try:
                toks = {
                    "text": [list(o.outputs[0].token_ids) for o in llm.generate(text, sp, lora_request=req, use_tqdm=False)],
                    "image": [list(o.outputs[0].token_ids) for o in llm.generate(mm, sp, lora_request=req, use_tqdm=False)],
                }
                result["runs"][run["name"]] = toks
            except Exception as e:  # noqa: BLE001 - the verdict is the point
                result["runs"][run["name"]] = {"error": f"{type(e).__name__}: {e}"}
                result["seconds"][run["name"]] = round(time.time() - t, 1)
                _save(out_path, result)
                break  # the engine may hang after a refusal
            result["seconds"][run["name"]] = round(time.time() - t, 1)
            _save(out_path, result)
        del llm
        gc.collect()
    result["seconds"]["total"] = round(time.time() - t0, 1)
    _save(out_path, result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
