"""Subprocess driver for the kill -9 and concurrency tests (run as ``python fault_driver.py ARGS_JSON``).

Imports once, then forks one child per run: each child is a separate process doing a real merge, killed
with SIGKILL at a random moment (or raced against a sibling). Forking after the imports keeps the test
fast; OMP_NUM_THREADS=1 keeps the fork safe (no thread pool exists yet). Prints one JSON object.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import sys
import time
import warnings
from pathlib import Path


def digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def state(out: Path, expected: set[str]) -> str:
    """'absent', 'complete', or a description of what is wrong (the test fails on anything else)."""
    from qvl_plugin.ckpt.view import open_checkpoint

    if not os.path.lexists(out):
        return "absent"
    names = sorted(os.listdir(out))
    if not (out / "config.json").is_file():
        return f"partial: no config.json in {names}"
    index = out / "model.safetensors.index.json"
    if index.exists():
        shards = set(json.loads(index.read_text())["weight_map"].values())
        missing = sorted(s for s in shards if not (out / s).is_file())
        if missing:
            return f"partial: index names missing shards {missing}"
    try:
        with open_checkpoint(out) as ckpt:
            got = {e.key for e in ckpt.entries}
    except Exception as e:  # noqa: BLE001 - report, the test asserts
        return f"partial: does not open ({type(e).__name__}: {e})"
    return "complete" if got == expected else f"partial: {len(expected - got)} tensors missing"


def adapter_state(out: Path, n_entries: int | None) -> str:
    """For a converted/extracted adapter (dir or .pth): 'absent', 'complete', or what is wrong."""
    from qvl_plugin.ckpt.view import open_checkpoint

    if not os.path.lexists(out):
        return "absent"
    if out.is_dir() and not (out / "adapter_config.json").is_file():
        return f"partial: no adapter_config.json in {sorted(os.listdir(out))}"
    try:
        with open_checkpoint(out) as ckpt:
            n = len(ckpt.entries)
    except Exception as e:  # noqa: BLE001
        return f"partial: does not open ({type(e).__name__}: {e})"
    return "complete" if n_entries is None or n == n_entries else f"partial: {n} of {n_entries} tensors"


def siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name != out.name)


def child(fn) -> int:
    pid = os.fork()
    if pid == 0:  # the child: one real merge, no output
        code = 1
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            fn()
            code = 0
        except BaseException:  # noqa: BLE001
            code = 1
        finally:
            os._exit(code)
    return pid


def main() -> None:
    args = json.loads(sys.argv[1])
    warnings.simplefilter("ignore")
    from qvl_plugin.ckpt.merge import merge
    from qvl_plugin.ckpt.view import open_checkpoint

    base, adapter, work = Path(args["base"]), Path(args["adapter"]), Path(args["work"])
    rng = random.Random(args.get("seed", 0))
    import peft  # noqa: F401 - pay every lazy import here, so the children spend their time merging
    import peft.utils.other  # noqa: F401
    import transformers  # noqa: F401
    from qvl_plugin.ckpt.inspect import summarize

    with open_checkpoint(base) as b:
        expected = {e.key for e in b.entries}
    with open_checkpoint(adapter) as a:
        summarize(a)
    result: dict = {"kills": [], "concurrent": {}}
    configs = [{"max_shard_size": "20MB"}, {"max_shard_size": "20MB", "dtype": "bf16"}]

    # reference runs (also time them: kill delays are drawn from [0, duration])
    ref_dir = work / "ref"
    ref_dir.mkdir()
    durations = []
    for i, cfg in enumerate(configs):
        t0 = time.monotonic()
        pid = child(lambda cfg=cfg, i=i: merge(adapter, base, ref_dir / f"out{i}", **cfg))
        _, status = os.waitpid(pid, 0)
        durations.append(time.monotonic() - t0)
        assert os.waitstatus_to_exitcode(status) == 0, f"reference merge {cfg} failed"
    result["durations"] = durations
    result["reference"] = digest(ref_dir / "out0")

    kill_dir = work / "kill"
    kill_dir.mkdir()
    out = kill_dir / "merged"
    for i in range(args.get("kills", 6)):
        k = i % len(configs)
        delay = rng.uniform(0, durations[k])  # a few runs may finish: that is allowed too
        pid = child(lambda k=k: merge(adapter, base, out, **configs[k]))
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        killed = os.WIFSIGNALED(status)
        st = state(out, expected)
        result["kills"].append({"delay": round(delay, 3), "killed": killed, "state": st, "left": siblings(out)})
        if os.path.lexists(out):
            shutil.rmtree(out)

    result["left_before_rerun"] = siblings(out)

    # convert (both ways) and extract, killed the same way
    if args.get("convert_extract", True):
        from qvl_plugin.ckpt.convert import convert
        from qvl_plugin.ckpt.extract import extract

        with open_checkpoint(adapter) as a:
            n_adapter = len(a.entries)
        dump = ref_dir / "dump.pth"
        ops = {
            "convert-pth": (lambda o: convert(adapter, "pth", o), "x.pth"),
            "convert-peft": (lambda o: convert(dump, "peft", o, adapter_config=adapter / "adapter_config.json"), "peft"),
            "extract": (lambda o: extract(ref_dir / "out0", base, o, rank=4), "extracted"),
        }
        result["ops"] = {}
        for name, (fn, leaf) in ops.items():
            odir = work / name
            odir.mkdir()
            t0 = time.monotonic()
            pid = child(lambda fn=fn, o=odir / ("ref-" + leaf): fn(o))
            code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
            dur = time.monotonic() - t0
            if name == "convert-pth" and code == 0:
                os.link(odir / ("ref-" + leaf), dump)
            entry = {"ref_code": code, "duration": dur, "kills": []}
            o = odir / leaf
            for i in range(args.get("op_kills", 3)):
                delay = rng.uniform(0, dur)
                pid = child(lambda fn=fn, o=o: fn(o))
                time.sleep(delay)
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                st = adapter_state(o, n_adapter if name != "extract" else None)
                entry["kills"].append({"delay": round(delay, 3), "state": st, "left": sorted(x for x in os.listdir(odir) if not x.startswith("ref-") and x != leaf)})
                if os.path.isdir(o):
                    shutil.rmtree(o)
                elif os.path.lexists(o):
                    os.unlink(o)
            # a rerun succeeds and clears what the killed runs left
            pid = child(lambda fn=fn, o=o: fn(o))
            entry["rerun_code"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
            entry["rerun_state"] = adapter_state(o, n_adapter if name != "extract" else None)
            entry["left_after_rerun"] = sorted(x for x in os.listdir(odir) if not x.startswith("ref-") and x != leaf)
            result["ops"][name] = entry

    # concurrent runs into one OUT, with and without --force
    for force in (False, True):
        cdir = work / f"conc-{force}"
        cdir.mkdir()
        cout = cdir / "merged"
        pids = [child(lambda: merge(adapter, base, cout, max_shard_size="20MB", force=force)) for _ in range(2)]
        codes = [os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in pids]
        result["concurrent"][str(force)] = {
            "codes": sorted(codes),
            "state": state(cout, expected),
            "same_bytes": os.path.isdir(cout) and digest(cout) == result["reference"],
            "left": siblings(cout),
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
