"""Longer fuzz run of the checkpoint readers (the strategies of tests/hardening/fuzzlib.py).

    python tools/fuzz_readers.py [N] [--target safetensors|adapter|dump|all] [--seed S]

Runs N inputs per reader target (N/10 merges of damaged adapters onto a tiny real base) through ``open_checkpoint`` + ``summarize`` + tensor loads and prints how many
were tried, how they ended (ok / QvlError) and every failure (another exception or a hang).
Exit status 1 when anything failed.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "hardening"))
sys.path.insert(0, str(ROOT))

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402

import fuzzlib  # noqa: E402

TARGETS = {
    "safetensors": fuzzlib.safetensors_inputs,
    "adapter": fuzzlib.adapter_config_inputs,
    "dump": fuzzlib.dump_inputs,
    "pth-bytes": fuzzlib.pth_bytes_inputs,
}


def fuzz(name: str, n: int, seed: int) -> tuple[Counter, list[str]]:
    outcomes: Counter = Counter()
    failures: list[str] = []

    @settings(
        max_examples=n,
        deadline=None,
        database=None,
        phases=[Phase.generate],  # no shrinking: report and move on
        suppress_health_check=list(HealthCheck),
    )
    @given(TARGETS[name]())
    def run(build):
        with tempfile.TemporaryDirectory() as d:
            built = build(Path(d))
            try:
                outcomes[fuzzlib.check_reader(built.path, timeout=5.0, **built.kwargs)] += 1
            except fuzzlib.Hang:
                outcomes["HANG"] += 1
                failures.append(f"{name}/{built.note}: hang")
            except Exception as e:  # the contract is broken: record it
                outcomes["FAIL"] += 1
                where = traceback.extract_tb(e.__traceback__)[-1]
                failures.append(f"{name}/{built.note}: {type(e).__name__}: {str(e)[:160]} at {Path(where.filename).name}:{where.lineno}")

    from hypothesis import seed as hseed

    hseed(seed)(run)()
    return outcomes, failures


def fuzz_merge(n: int, seed: int) -> tuple[Counter, list[str]]:
    """Damaged adapters merged onto a tiny real Qwen2-VL base (built once)."""
    import warnings

    from hypothesis import seed as hseed

    import hardening_util
    from test_fuzz_merge import check_merge

    from qvl_plugin.ckpt.view import open_checkpoint

    root = Path(tempfile.mkdtemp(prefix="qvl-fuzz-merge-"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hardening_util.build_qwen2_vl(root / "base", vocab=512, max_shard_size="100KB")
    with open_checkpoint(root / "base") as ckpt:
        entries = [(e.key, e.shape, e.dtype) for e in ckpt.entries]
    names = {k for k, _, _ in entries}
    outcomes: Counter = Counter()
    failures: list[str] = []

    @settings(max_examples=n, deadline=None, database=None, phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(fuzzlib.merge_inputs(entries))
    def run(build):
        try:
            outcomes[check_merge(build, root / "base", names)] += 1
        except Exception as e:  # noqa: BLE001
            outcomes["FAIL"] += 1
            where = traceback.extract_tb(e.__traceback__)[-1]
            failures.append(f"merge: {type(e).__name__}: {str(e)[:160]} at {Path(where.filename).name}:{where.lineno}")

    hseed(seed)(run)()
    shutil.rmtree(root, ignore_errors=True)
    return outcomes, failures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("n", type=int, nargs="?", default=2000, help="inputs per target (default 2000)")
    ap.add_argument("--target", choices=[*TARGETS, "merge", "all"], default="all", help="'all' = the readers + merge")
    ap.add_argument("--seed", type=int, default=None, help="random seed (default: a fresh one, printed)")
    args = ap.parse_args()
    total, all_failures = 0, []
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    print(f"seed {seed}")
    for name in [*TARGETS, "merge"] if args.target == "all" else [args.target]:
        t0 = time.time()
        if name == "merge":
            outcomes, failures = fuzz_merge(max(1, args.n // 10), seed)  # a merge costs ~10 reader runs
        else:
            outcomes, failures = fuzz(name, args.n, seed)
        tried = sum(outcomes.values())
        total += tried
        print(f"{name}: {tried} inputs tried in {time.time() - t0:.1f} s -> {dict(sorted(outcomes.items()))}")
        all_failures += failures
    print(f"total inputs tried: {total}; failures: {len(all_failures)}")
    for f in dict.fromkeys(all_failures):  # unique, in order
        print("  FAIL", f)
    return 1 if all_failures else 0


if __name__ == "__main__":
    sys.exit(main())
