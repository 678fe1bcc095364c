"""What difflora tells a person about an adapter or a blend, once, for the command line and the web UI alike.

:func:`describe_adapter` is the summary as data (``difflora inspect --json`` prints it); :func:`summary_rows` the
same as labelled lines that the CLI prints as text and the UI as Markdown; :func:`error_summary` the one line about a
blend's or resize's per-module error.
"""

from __future__ import annotations

import collections
import json

from .adapter import AdapterState

__all__ = ["compat_lines", "describe_adapter", "error_summary", "summary_rows", "trigger_words", "worst_modules"]

# Training options shown from an adapter's difflora.training_config, in this order.
_TRAINING_SHOWN = ("steps", "rank", "alpha", "lr", "batch_size", "resolution", "trigger_word", "data", "seed")


def trigger_words(metadata: dict[str, str], limit: int = 5) -> list[str]:
    """Words that call up an adapter: difflora's ``difflora.trigger_words``, else kohya's most frequent tags."""
    try:
        words = json.loads(metadata.get("difflora.trigger_words", "[]"))
        if isinstance(words, list) and words:
            return [str(word) for word in words][:limit]
    except json.JSONDecodeError:
        pass
    try:
        frequencies = json.loads(metadata.get("ss_tag_frequency", "{}"))
    except json.JSONDecodeError:
        return []
    counts: collections.Counter[str] = collections.Counter()
    if isinstance(frequencies, dict):
        for tags in frequencies.values():  # {dataset folder: {tag: count}}
            if isinstance(tags, dict):
                counts.update({str(tag).strip(): int(count) for tag, count in tags.items() if str(count).isdigit()})
    return [tag for tag, _ in counts.most_common(limit) if tag]


def describe_adapter(state: AdapterState) -> dict:
    """Format, ranks, alphas, modules and targets per component, the keys not applied, trigger words, metadata."""
    return {
        "format": state.source_format,
        "ranks": state.ranks(),
        "alphas": state.alphas(),
        "use_rslora": any(weights.use_rslora for weights in state.modules.values()),
        "modules": len(state.modules),
        "modules_per_component": state.modules_per_component(),
        "algorithms": state.kinds(),
        "layer_kinds": state.layer_kinds(),
        "targets": state.targets(),
        "skipped": list(state.skipped),
        "trigger_words": trigger_words(state.metadata),
        "metadata": dict(state.metadata),
    }


def _base_model(metadata: dict[str, str]) -> str | None:
    for key in ("difflora.base_model", "ss_sd_model_name", "modelspec.architecture"):
        if metadata.get(key):
            return metadata[key]
    return None


def _training(metadata: dict[str, str]) -> str | None:
    try:
        config = json.loads(metadata.get("difflora.training_config") or "null")
    except json.JSONDecodeError:
        return None
    if not isinstance(config, dict):
        return None
    return ", ".join(f"{key} {config[key]}" for key in _TRAINING_SHOWN if key in config) or None


def summary_rows(summary: dict) -> list[tuple[str, str]]:
    """``describe_adapter``'s summary as (label, value) lines, the rows both ``inspect`` and the UI show."""
    per_component = summary["modules_per_component"]
    layers = "; ".join(f"{component}: " + ", ".join(f"{kind} {count}" for kind, count in kinds.items())
                       for component, kinds in summary.get("layer_kinds", {}).items())
    rows = [
        ("format", summary["format"]),
        ("algorithms", ", ".join(summary.get("algorithms", [])) or "lora"),
        ("ranks", ", ".join(map(str, summary["ranks"]))),
        ("alphas", ", ".join(f"{alpha:g}" for alpha in summary["alphas"])),
        ("rsLoRA", "yes" if summary["use_rslora"] else "no"),
        ("modules", ", ".join(f"{component}: {count}" for component, count in per_component.items())),
        ("layers", layers),
        ("targets", ", ".join(f"{component}: {'/'.join(names)}" for component, names in summary["targets"].items())),
    ]
    metadata = summary["metadata"]
    optional = [
        ("trigger words", ", ".join(summary.get("trigger_words") or [])),
        ("base model", _base_model(metadata)),
        ("training", _training(metadata)),
    ]
    rows += [(label, value) for label, value in optional if value]
    if summary["skipped"]:
        skipped = AdapterState(modules={}, skipped=summary["skipped"])
        rows.append(("not applied", skipped.skipped_summary(limit=10)))
    return rows


def worst_modules(relative_errors: dict[str, float], count: int = 5) -> list[tuple[str, float]]:
    """The ``count`` modules with the largest relative error, largest first."""
    ranked = sorted(relative_errors.items(), key=lambda item: item[1], reverse=True)
    return ranked[:count]


def error_summary(relative_errors: dict[str, float]) -> str:
    """One line on a blend's or resize's per-module relative error ``‖ΔW_exact − ΔW_result‖ / ‖ΔW_exact‖``."""
    if not relative_errors:
        return "no modules"
    (worst, largest), = worst_modules(relative_errors, 1)
    mean = sum(relative_errors.values()) / len(relative_errors)
    modules = f"{len(relative_errors)} module" + ("s" if len(relative_errors) != 1 else "")
    return f"{modules}, relative error per module: mean {mean:.3e}, max {largest:.3e} ({worst})"


def compat_lines(compat: list[dict]) -> list[str]:
    """``difflora.compat`` reports (``ToolReport.as_dict()``) as lines, one block per tool: a headline
    (``diffusers (…): applies 10 of 12 modules, 2 of them differently`` or why the load fails), then each group,
    applied first (``  differs: LoRA+DoRA linear ×36 — DoRA magnitude dropped …``)."""
    order = ("applies", "differs", "ignores")
    lines = []
    for tool in compat:
        head = f"{tool['tool']} ({tool['target']}): "
        if not tool["loads"]:  # its groups would say what it does with a file it refuses
            lines.append(head + f"load fails — {tool['failure']}; applies 0 of {tool['modules']} modules")
            continue
        differently = f", {tool['differs']} of them differently" if tool["differs"] else ""
        lines.append(head + f"applies {tool['applied']} of {tool['modules']} modules{differently}")
        for group in sorted(tool["groups"], key=lambda group: (order.index(group["outcome"]), group["algorithm"],
                                                              group["layer"], group["reason"])):
            reason = f" — {group['reason']}" if group["reason"] else ""
            lines.append(f"  {group['outcome']}: {group['algorithm']} {group['layer']} ×{group['modules']}{reason}")
    return lines
