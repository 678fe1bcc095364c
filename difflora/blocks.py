"""Per-block weights: how strongly an adapter acts in the UNet's down, mid and up blocks and in the text encoders.

Written as ``down=0.5,mid=1,up=0`` (a whole part), ``up.1=0.3`` (one block index; it wins over its part) and
``te=1`` / ``text_encoder=1`` (every text encoder), like AUTOMATIC1111's lora-block-weight extension.

Every value is a finite number in [-100, 100] and every block is named once; a per-block name must be a block of
the model it is used on (:meth:`BlockWeights.check_blocks`, with the blocks from :func:`unet_blocks`), or without a
model, one an SD or SDXL UNet has (:data:`SD_UNET_BLOCKS`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

from .errors import InvalidArgumentError, number_in

__all__ = ["MAX_BLOCK_WEIGHT", "SD_UNET_BLOCKS", "BlockWeights", "block_of", "describe_blocks", "unet_blocks"]

# A block weight multiplies an adapter's weight (itself within ±100) in part of the model. Users write 0, 0.5, 1
# and now and then 2 or -1; ±100 leaves every deliberate value in and keeps typos such as 1e38 or nan out. What a
# weight × block weight does to a half-precision layer is checked on the model (MultiLoRA.check_range).
MAX_BLOCK_WEIGHT = 100.0
# The per-block names a Stable Diffusion UNet has: SD 1.x/2.x have four down and four up blocks, SDXL three of each.
# Without a model (scaling a file), a name is checked against these; with one, against its own blocks.
SD_UNET_BLOCKS = frozenset({*(f"down.{index}" for index in range(4)), *(f"up.{index}" for index in range(4))})
_PER_BLOCK = re.compile(r"(down|up)\.\d+")

_UNET_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.|^(mid_block)\.")


@functools.lru_cache(maxsize=65536)  # asked per branch per adapter whenever a weight changes
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


def unet_blocks(module_paths: Iterable[tuple[str, str]]) -> set[str]:
    """The per-block names (``down.0``, ``up.2``) that ``(component, path)`` pairs sit in: the blocks of a model
    (from its attention blocks' paths) or of an adapter (from its modules')."""
    found = set()
    for component, path in module_paths:
        kind, index = block_of(component, path)
        if index is not None:
            found.add(f"{kind}.{index}")
    return found


def describe_blocks(blocks: Collection[str]) -> str:
    """``down.0–down.1, up.0–up.2`` (runs of consecutive indices), or ``none``."""
    runs = []
    for kind in ("down", "up"):
        indices = sorted(int(name.split(".")[1]) for name in blocks if name.startswith(kind + "."))
        start = previous = None
        for index in [*indices, None]:
            if start is not None and index != previous + 1:
                runs.append(f"{kind}.{start}" if start == previous else f"{kind}.{start}–{kind}.{previous}")
                start = None
            if start is None:
                start = index
            previous = index
    return ", ".join(runs) or "none"


def _block_weight(value, what: str) -> float:
    """``value`` as a block weight, or :class:`InvalidArgumentError` (``block_weights``) naming ``what``."""
    return number_in(value, -MAX_BLOCK_WEIGHT, MAX_BLOCK_WEIGHT, what, "block_weights", convert=True)


@dataclass(frozen=True)
class BlockWeights:
    """Multipliers per part of the model, applied on top of an adapter's weight. 1.0 everywhere leaves it as it is."""

    down: float = 1.0
    mid: float = 1.0
    up: float = 1.0
    text_encoder: float = 1.0
    per_block: dict[str, float] = field(default_factory=dict)  # "down.0", "up.2", ...

    def __post_init__(self) -> None:
        for part in ("down", "mid", "up", "text_encoder"):
            object.__setattr__(self, part, _block_weight(getattr(self, part), f"block_weights: {part}"))
        for key in self.per_block:
            if not isinstance(key, str) or not _PER_BLOCK.fullmatch(key):
                raise InvalidArgumentError(f"block_weights: unknown block {key!r}; use down.N or up.N",
                                           "block_weights")
        checked = {key: _block_weight(value, f"block_weights: {key}") for key, value in self.per_block.items()}
        object.__setattr__(self, "per_block", checked)

    def check_blocks(self, available: Collection[str], holder: str = "the model") -> None:
        """Refuse per-block names not in ``available`` (:func:`unet_blocks` of a model or an adapter; ``holder``
        says which), naming the blocks there are; :class:`InvalidArgumentError` (``block_weights``). Unchecked, a
        name that matches nothing would be silently ignored."""
        unknown = self.blocks_outside(available)
        if unknown:
            raise InvalidArgumentError(
                f"block_weights: {', '.join(unknown)}: {holder} has no such block (its blocks: "
                f"{describe_blocks(available)})", "block_weights")

    def blocks_outside(self, available: Collection[str]) -> list[str]:
        """The per-block names not in ``available``, sorted."""
        return sorted(set(self.per_block) - set(available))

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
    def parse(cls, text: str, option: str = "block_weights") -> BlockWeights:
        """Parse ``down=0.5,mid=1,up=0,up.1=0.3,te=1``; raises :class:`InvalidArgumentError` naming ``option`` (what the
        caller calls the text: a flag, a form field) and the bad item."""
        parts: dict[str, float] = {}
        per_block: dict[str, float] = {}
        written: dict[str, str] = {}  # each block's canonical name → the item that set it
        for item in filter(None, (piece.strip() for piece in text.split(","))):
            key, separator, value_text = item.partition("=")
            key = key.strip().lower()
            if not separator:
                raise InvalidArgumentError(f"{option}: {item!r} is not NAME=NUMBER (e.g. down=0.5,mid=1,up.1=0)",
                                           "block_weights")
            value = _block_weight(value_text.strip(), f"{option}: {key}")
            if key in ("te", "text", "text_encoder"):
                name, target = "text_encoder", parts
            elif key in ("down", "mid", "up"):
                name, target = key, parts
            elif _PER_BLOCK.fullmatch(key):
                kind, _, index = key.partition(".")
                name, target = f"{kind}.{int(index)}", per_block  # up.01 is up.1, as block_of names it
            else:
                raise InvalidArgumentError(
                    f"{option}: unknown block {key!r}; use down, mid, up, down.N, up.N or te", "block_weights"
                )
            if name in written:  # the last one would win silently
                raise InvalidArgumentError(f"{option}: {written[name]!r} and {item!r} both set block {name}; give "
                                           "each block once", "block_weights")
            written[name], target[name] = item, value
        return cls(**parts, per_block=per_block)

    def __str__(self) -> str:
        items = [f"down={self.down:g}", f"mid={self.mid:g}", f"up={self.up:g}", f"te={self.text_encoder:g}"]
        items += [f"{key}={value:g}" for key, value in sorted(self.per_block.items())]
        return ",".join(items)
