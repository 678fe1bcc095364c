"""Per-block weights: how strongly an adapter acts in the UNet's down, mid and up blocks and in the text encoders.

Written as ``down=0.5,mid=1,up=0`` (a whole part), ``up.1=0.3`` (one block index; it wins over its part) and
``te=1`` / ``text_encoder=1`` (every text encoder), like AUTOMATIC1111's lora-block-weight extension.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .errors import InvalidArgumentError, finite_number

__all__ = ["BlockWeights", "block_of"]

_UNET_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.|^(mid_block)\.")


def block_of(component: str, path: str) -> tuple[str, int | None]:
    """``(kind, index)`` of a module path: ``("down", 1)``, ``("mid", None)``, ``("up", 0)`` or ``("text", None)``."""
    if component != "unet":
        return "text", None
    match = _UNET_BLOCK.match(path)
    if match is None:
        return "other", None
    if match.group(3):
        return "mid", None
    return ("down" if match.group(1) == "down_blocks" else "up"), int(match.group(2))


@dataclass(frozen=True)
class BlockWeights:
    """Multipliers per part of the model, applied on top of an adapter's weight. 1.0 everywhere leaves it as it is."""

    down: float = 1.0
    mid: float = 1.0
    up: float = 1.0
    text_encoder: float = 1.0
    per_block: dict[str, float] = field(default_factory=dict)  # "down.0", "up.2", ...

    def factor(self, component: str, path: str) -> float:
        kind, index = block_of(component, path)
        if kind == "text":
            return self.text_encoder
        if index is not None and f"{kind}.{index}" in self.per_block:
            return self.per_block[f"{kind}.{index}"]
        return {"down": self.down, "mid": self.mid, "up": self.up}.get(kind, 1.0)

    @property
    def is_identity(self) -> bool:
        return (self.down, self.mid, self.up, self.text_encoder) == (1.0, 1.0, 1.0, 1.0) and all(
            value == 1.0 for value in self.per_block.values()
        )

    @classmethod
    def parse(cls, text: str, option: str = "block weights") -> BlockWeights:
        """Parse ``down=0.5,mid=1,up=0,up.1=0.3,te=1``; raises :class:`InvalidArgumentError` naming ``option`` (what the
        caller calls the text: a flag, a form field) and the bad item."""
        parts: dict[str, float] = {}
        per_block: dict[str, float] = {}
        for item in filter(None, (piece.strip() for piece in text.split(","))):
            key, separator, value_text = item.partition("=")
            key = key.strip().lower()
            if not separator:
                raise InvalidArgumentError(f"{option}: {item!r} is not NAME=NUMBER (e.g. down=0.5,mid=1,up.1=0)")
            value = finite_number(value_text.strip(), f"{option}: {key}")
            if key in ("te", "text", "text_encoder"):
                parts["text_encoder"] = value
            elif key in ("down", "mid", "up"):
                parts[key] = value
            elif re.fullmatch(r"(down|up)\.\d+", key):
                per_block[key] = value
            else:
                raise InvalidArgumentError(
                    f"{option}: unknown block {key!r}; use down, mid, up, down.N, up.N or te"
                )
        return cls(**parts, per_block=per_block)

    def __str__(self) -> str:
        items = [f"down={self.down:g}", f"mid={self.mid:g}", f"up={self.up:g}", f"te={self.text_encoder:g}"]
        items += [f"{key}={value:g}" for key, value in sorted(self.per_block.items())]
        return ",".join(items)
