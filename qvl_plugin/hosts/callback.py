"""``QvlSaveCallback``: the recipe's save formats from inside any HF ``Trainer`` (and TRL's trainers, which
are Trainers), correct under DeepSpeed ZeRO-3 and FSDP."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from transformers import TrainerCallback

from .saving import SavedOutputs, save_outputs

if TYPE_CHECKING:  # pragma: no cover
    from ..recipes import Recipe

__all__ = ["QvlSaveCallback"]


class QvlSaveCallback(TrainerCallback):
    """Writes what ``recipe.save`` asks for — ``adapter/``, ``adapter.pth``, ``merged/`` — gathered and checked.

    * at every Trainer save: into ``<output_dir>/checkpoint-<step>/`` (adapter and dump; a merged model
      only with ``merge_on_save=True``, since it is a full model copy per checkpoint);
    * at the end of training: into ``final_dir`` (default: the Trainer's ``output_dir``), merged included.

    The gathers are collectives, so the callback runs on every rank; only rank 0 writes. A zero-element
    or truncated tensor (ZeRO-3 placeholders, FSDP shards) is refused with its key names.
    ``base_path`` is the HF model dir training started from (needed for ``merged``).
    """

    def __init__(
        self,
        recipe: "Recipe | None" = None,
        *,
        base_path: str | Path | None = None,
        formats: Iterable[str] | None = None,
        final_dir: str | Path | None = None,
        merge_on_save: bool = False,
        adapter_name: str = "default",
    ) -> None:
        if formats is None:
            formats = recipe.save if recipe is not None else ("adapter", "pth")
        self.formats = tuple(formats)
        self.base_path = Path(base_path) if base_path is not None else None
        if "merged" in self.formats and self.base_path is None:
            from ..errors import UsageError

            raise UsageError("QvlSaveCallback: 'merged' is in the save formats but no base_path was given")
        self.final_dir = Path(final_dir) if final_dir is not None else None
        self.merge_on_save = merge_on_save
        self.adapter_name = adapter_name
        self.saved: list[SavedOutputs] = []

    def _save(self, model, directory: Path, formats: tuple[str, ...]) -> None:
        if model is None or not formats:
            return
        self.saved.append(
            save_outputs(model, directory, formats, base_path=self.base_path, adapter_name=self.adapter_name)
        )

    def on_save(self, args, state, control, model=None, **kwargs):
        formats = self.formats if self.merge_on_save else tuple(f for f in self.formats if f != "merged")
        self._save(model, Path(args.output_dir) / f"checkpoint-{state.global_step}", formats)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._save(model, self.final_dir or Path(args.output_dir), self.formats)

    @property
    def final(self) -> SavedOutputs | None:
        """What the end-of-training save wrote (rank 0), if it ran."""
        return self.saved[-1] if self.saved else None
