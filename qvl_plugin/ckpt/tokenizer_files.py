"""The tokenizer that goes with a resized vocabulary: which files SRC ships, and how many ids they define.

A model with new token rows is only usable with the tokenizer that added those tokens. A Trainer or host
output dir usually holds it next to the adapter (``checkpoint-N/`` or ``output_dir/``), so SRC's own
directory is looked at first, then the directory holding SRC (a ``.pth`` dump, or an ``adapter/`` sub-dir).
Lengths come from the tokenizers library (``tokenizer.json``) or the slow files' JSON; nothing is executed.
"""

from __future__ import annotations

from pathlib import Path

from .safety import read_json

__all__ = ["TOKENIZER_FILES", "tokenizer_dir", "tokenizer_files", "tokenizer_length", "tokenizer_fit", "with_src_tokenizer", "unsaved_resize"]

# tokenizer, processor and chat-template files that must travel with new token rows
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "tokenizer.model", "qwen.tiktoken", "preprocessor_config.json", "processor_config.json",
    "video_preprocessor_config.json", "chat_template.jinja", "chat_template.json",
)
_DEFINES_IDS = ("tokenizer.json", "vocab.json", "tokenizer_config.json", "added_tokens.json", "tokenizer.model", "qwen.tiktoken")


def _has_tokenizer(d: Path) -> bool:
    return d.is_dir() and any((d / n).is_file() for n in _DEFINES_IDS)


def tokenizer_dir(src: str | Path) -> Path | None:
    """SRC itself when it is a directory with a tokenizer, else the directory holding SRC, else None."""
    src = Path(src).absolute()
    for d in ([src] if src.is_dir() else []) + [src.parent]:
        if _has_tokenizer(d):
            return d
    return None


def tokenizer_files(directory: Path) -> list[Path]:
    return [directory / n for n in TOKENIZER_FILES if (directory / n).is_file()]


def _ids(obj) -> list[int]:
    return [v for v in obj.values() if isinstance(v, int) and not isinstance(v, bool)] if isinstance(obj, dict) else []


def tokenizer_length(directory: Path) -> int | None:
    """The number of rows the tokenizer's ids need (largest id + 1), or None when it cannot be told."""
    ids: list[int] = []
    fast = directory / "tokenizer.json"
    try:
        if fast.is_file():
            from tokenizers import Tokenizer

            ids += list(Tokenizer.from_file(str(fast)).get_vocab(with_added_tokens=True).values())
        for name in ("vocab.json", "added_tokens.json"):
            if (directory / name).is_file():
                ids += _ids(read_json(directory / name))
        cfg = directory / "tokenizer_config.json"
        if cfg.is_file():
            decoder = (read_json(cfg) or {}).get("added_tokens_decoder")
            if isinstance(decoder, dict):
                ids += [int(k) for k in decoder if str(k).isdigit()]
    except Exception:  # noqa: BLE001 - an unreadable tokenizer is "unknown", and reported as such
        return None
    return max(ids) + 1 if ids else None


def tokenizer_fit(src: str | Path, base_rows: int, rows: int) -> tuple[Path | None, str | None]:
    """(SRC's tokenizer dir, a problem sentence or None) for a vocabulary resized from ``base_rows`` to ``rows``."""
    d = tokenizer_dir(src)
    if d is None:
        return None, (f"SRC ships no tokenizer: the base's cannot encode the new tokens (ids {base_rows}..{rows - 1}); "
                      "copy the tokenizer that added them into the merged dir") if rows > base_rows else None
    n = tokenizer_length(d)
    if n is None:
        return d, f"the tokenizer in {d} could not be read to check its length against {rows} rows"
    if n > rows:
        return d, f"the tokenizer in {d} needs {n} rows but the model has {rows}: ids {rows}..{n - 1} cannot be encoded"
    if rows > base_rows and n <= base_rows:
        return d, (f"the tokenizer in {d} has {n} ids, none of the new rows {base_rows}..{rows - 1}: the merged model "
                   "cannot encode the new tokens with it")
    return d, None


def with_src_tokenizer(files: list[Path], src: str | Path, base_rows: int, rows: int) -> tuple[list[Path], list[str]]:
    """The base's support files with SRC's tokenizer/processor/chat-template files in place of the base's."""
    d, problem = tokenizer_fit(src, base_rows, rows)
    notes = [problem] if problem else []
    if d is None:
        return files, notes
    own = tokenizer_files(d)
    names = {p.name for p in own}
    notes.append(f"tokenizer files from {d} replace the base's: {', '.join(sorted(names))}")
    return [f for f in files if f.name not in names] + own, notes


def unsaved_resize(src: str | Path, rows: int, fix: str) -> str | None:
    """A sentence when SRC's tokenizer needs more rows than the adapter carries (``rows``, the base's): the
    model was resized for new tokens but the adapter did not save the resized embedding."""
    d = tokenizer_dir(src)
    n = tokenizer_length(d) if d is not None else None
    if n is None or n <= rows:
        return None
    return (f"the tokenizer in {d} has {n} ids but the adapter carries no rows beyond the base's {rows}: the model was "
            f"resized for new tokens and the resized embedding was not saved; {fix}")
