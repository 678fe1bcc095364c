"""diffusers' older key spellings, read beside its current ones (see :data:`difflora.formats.diffusers.KEY_SPELLINGS`):

* ``diffusers-old`` (diffusers 0.2x, ``LoRACompatibleLinear``): ``<path>.lora.down.weight`` / ``.lora.up.weight``;
* ``diffusers-attn-procs`` (``save_attn_procs`` and the text-encoder patch before it): the attention-processor keys
  ``<block>.processor.to_q_lora.down.weight`` and the text-encoder ``<path>.lora_linear_layer.down.weight``.

One file may mix them: diffusers 0.21 wrote ``.lora.down`` UNet keys beside ``lora_linear_layer`` text-encoder keys.
A DoRA magnitude spelled on an attention's ``to_out`` list (``<block>.to_out.lora_magnitude_vector``, which
diffusers renames to ``to_out.0``) belongs to its Linear ``to_out.0``.
Neither carries alphas (alpha = rank) unless the file has ``.alpha`` keys. difflora reads these and never writes them.
"""

from __future__ import annotations

import re

__all__ = ["ATTENTION_PROCESSORS", "OLD", "match_key"]

OLD = "diffusers-old"
ATTENTION_PROCESSORS = "diffusers-attn-procs"

# (pattern on a key with its component prefix removed, format name, factor); group 1 is the module path.
_FACTOR_PATTERNS = [
    (re.compile(r"^(.+)\.lora\.down\.weight$"), OLD, "down"),
    (re.compile(r"^(.+)\.lora\.up\.weight$"), OLD, "up"),
    (re.compile(r"^(.+)\.lora_linear_layer\.down\.weight$"), ATTENTION_PROCESSORS, "down"),
    (re.compile(r"^(.+)\.lora_linear_layer\.up\.weight$"), ATTENTION_PROCESSORS, "up"),
]
_TO_OUT_MAGNITUDE = re.compile(r"^(.+\.to_out)\.lora_magnitude_vector(?:\.[A-Za-z0-9_-]+)?(?:\.weight)?$")
# The processor of an attention block held the factors of its four projections.
_PROCESSOR = re.compile(r"^(.+)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")


def match_key(rest: str) -> tuple[str, str, str] | None:
    """``(module path, format name, 'down'|'up'|'magnitude')`` of a key in a legacy spelling (component prefix
    removed), else ``None``: ``mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight`` →
    ``("mid_block.….attn1.to_out.0", "diffusers-attn-procs", "up")``."""
    processor = _PROCESSOR.match(rest)
    if processor:
        block, projection, factor = processor.groups()
        projection = "to_out.0" if projection == "to_out" else projection
        return f"{block}.{projection}", ATTENTION_PROCESSORS, factor
    to_out_magnitude = _TO_OUT_MAGNITUDE.match(rest)
    if to_out_magnitude:
        return f"{to_out_magnitude.group(1)}.0", OLD, "magnitude"
    for pattern, format_name, factor in _FACTOR_PATTERNS:
        match = pattern.match(rest)
        if match:
            return match.group(1), format_name, factor
    return None
