"""A tiny model whose validation metric follows a script, for testing what callbacks do with it."""

from __future__ import annotations

from typing import Any

from tests.helpers.tiny import TinyMLP


class ScriptedMLP(TinyMLP):
    """:class:`TinyMLP` that logs ``val_score = script[current_epoch]`` (the last entry after the script ends)."""

    def __init__(self, script: list[float], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.script = list(script)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        epoch = min(self.current_epoch, len(self.script) - 1)
        self.log("val_score", float(self.script[epoch]))
