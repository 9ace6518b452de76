"""Post-install fix for a venv whose torchvision wheel is a CUDA build next to a CPU torch.

The registry's torchvision here is built for CUDA: its ``_C.so`` fails to load beside CPU torch and the
import then dies in ``_meta_registrations.py`` (``operator torchvision::nms does not exist``). vLLM's
Qwen2-VL path imports the image processor, which needs only torchvision's pure-Python transforms. This
removes the compiled ops and lets the two fake-kernel registrations for them be skipped. Idempotent.
Run as ``python cpu_torchvision.py`` inside the venv.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

_GUARD = '''
def _qvl_register_fake(name):  # added by qvl_plugin tests: the compiled op is absent in this venv
    def wrap(fn):
        try:
            return torch.library.register_fake(name)(fn)
        except RuntimeError:
            return fn
    return wrap
'''


def main() -> int:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        print("torchvision is not installed; nothing to do")
        return 0
    root = Path(spec.origin).parent
    for so in root.glob("_C*.so"):
        so.unlink()
    meta = root / "_meta_registrations.py"
    text = meta.read_text()
    if "_qvl_register_fake" not in text:
        text, n = re.subn(r'@torch\.library\.register_fake\("(torchvision::[a-z_]+)"\)', r'@_qvl_register_fake("\1")', text)
        anchor = text.index("\n\n", text.index("import torch"))
        text = text[:anchor] + "\n" + _GUARD + text[anchor:]
        meta.write_text(text)
        print(f"guarded {n} register_fake calls in {meta}")
    import torchvision.transforms  # noqa: F401  - the check: pure-Python transforms import
    return 0


if __name__ == "__main__":
    sys.exit(main())
