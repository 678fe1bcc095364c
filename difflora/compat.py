"""What other tools would apply of an adapter file: diffusers, ComfyUI, AUTOMATIC1111 and Forge.

:func:`compat_report` takes a file's raw tensors and header (and the :class:`~difflora.adapter.AdapterState`
difflora read from them) and says, per tool, whether the tool loads the file at all and, module by module, whether
it applies the module as the file means it (``applies``: the weights difflora's merge gives, for what difflora
reads), applies it differently (``differs``: a DoRA magnitude dropped or normalised on another axis, a scale read
differently) or leaves it out (``ignores``: a name its key map does not hold). The rules are read from each tool's
code, at these versions:

* **diffusers 0.42** (installed): ``StableDiffusion[XL]LoraLoaderMixin.load_lora_weights``, ``lora_state_dict``
  and ``lora_conversion_utils``. ``dora_scale`` keys are dropped with a warning; a file whose every key is kohya's
  (``lora_unet_``/``lora_te[12]_``) goes through ``_convert_non_diffusers_lora_to_diffusers``, which takes
  ``lora_down``/``lora_up``/``alpha`` only and raises ``ValueError`` on any other key (LoHa, LoKr, full diffs,
  ``lora_mid``): the load fails. The SDXL pipeline maps original-layout names first
  (``_maybe_map_sgm_blocks_to_diffusers``), dropping them when a file mixes both layouts. Any key without ``lora``
  in its name fails the load ("Invalid LoRA checkpoint"). kohya alphas become one ``LoraConfig`` per
  component whose ``alpha_pattern`` names attention projections by their converted keys, which match no module: an
  attention projection gets its component's commonest alpha (other layers their own). diffusers-style
  ``add_embedding_linear_N`` names are not converted (only ``label_emb_0_N``); PEFT DoRA (``lora_magnitude_vector``)
  is applied. Each rule is checked against the installed diffusers by ``tests/test_compat.py``.
* **ComfyUI** (``comfy/lora.py`` and ``comfy/weight_adapter/`` of mid-2025, the QwenImage-era key maps):
  ``model_lora_keys_unet`` maps every UNet weight under kohya's names in both layouts, ``lycoris_``,
  ``diffusion_model.`` and diffusers' names with attention projections spelled ``….processor.to_q`` (so PEFT's
  ``….attn1.to_q.lora_A`` is not mapped); ``model_lora_keys_clip`` maps CLIP's ``q/k/v/out_proj`` and
  ``mlp.fc1/fc2`` (``text_projection`` only as ``lora_te1_``/``lora_te2_``). ``load_lora`` reads LoRA (Tucker
  too), LoHa, LoKr, GLoRA, OFT/BOFT, ``diff``/``diff_b``, ``w_norm``/``b_norm`` and ``dora_scale``; it ignores
  diffusers' ``lora_adapter_metadata`` (scale 1 without an ``.alpha`` key) and PEFT's ``lora_magnitude_vector``;
  unmatched keys are logged ("lora key not loaded"). ``weight_adapter.base.weight_decompose`` normalises a DoRA per
  output row by the base weight ``‖W‖``, not ``‖W + ΔW‖`` (open PR Comfy-Org/ComfyUI#15458), per input column by
  ``‖W + ΔW‖`` as difflora does.
* **AUTOMATIC1111 1.10** (``extensions-builtin/Lora``: ``networks.py`` ``load_network`` and
  ``convert_diffusers_name_to_compvis``, ``network.py``, ``network_*.py``): kohya names in both layouts (SD 1.x block
  arithmetic, so SDXL's first upsampler and ``add_embedding`` in diffusers-style names match nothing), ``lora_te_``/
  ``lora_te1_``/``lora_te2_`` CLIP layers (CLIP-G attention through its ``MultiheadAttention``, only with q, k, v and
  out together); no ``lycoris_``, ``diffusion_model.`` or diffusers/PEFT names. A matched module no module type
  accepts raises, and the whole file fails to load. ``NetworkModule.apply_weight_decompose`` normalises every DoRA
  per input column, so a per-output-row magnitude is applied wrongly.
* **Forge** (lllyasviel/stable-diffusion-webui-forge ``dfdcbab``, 2025-06: ``extensions-builtin/sd_forge_lora``,
  ``backend/patcher/lora.py``, ``packages_3rdparty/comfyui_lora_collection``): ComfyUI's key maps and loaders of
  2024 (no OFT/BOFT, no ``text_encoders.`` names), ComfyUI's DoRA
  normalisation, and one rule of its own: more than 12 keys it cannot place and the file is not applied at all
  ("LoRA version mismatch").
"""

from __future__ import annotations

import collections
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from .adapter import AdapterState, ModuleWeights
from .formats._kohya_names import text_layer_path, unet_layer_path
from .keys import COMPONENTS, join_module_key, split_projection

__all__ = ["APPLIES", "DIFFERS", "IGNORES", "TOOLS", "FileModule", "ToolReport", "compat_report", "file_modules"]

TOOLS = ("diffusers", "ComfyUI", "A1111", "Forge")
APPLIES, DIFFERS, IGNORES = "applies", "differs", "ignores"
_OUTCOMES = (APPLIES, DIFFERS, IGNORES)
# Forge drops a whole file when more keys than this find no layer (sd_forge_lora/networks.py).
_FORGE_UNMATCHED_LIMIT = 12

# ----- the file's modules -------------------------------------------------------------------------------------------

# Every part a module's key may end in, longest first so that ``lora_B.weight`` wins over ``weight``.
_PARTS = sorted([
    "lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha", "dora_scale",
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
    "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
    "diff", "diff_b", "w_norm", "b_norm", "set_weight", "oft_blocks", "oft_diag", "rescale", "on_input", "weight",
    "a1.weight", "a2.weight", "b1.weight", "b2.weight",
    "lora_A.weight", "lora_B.weight", "lora_B.bias", "lora_magnitude_vector", "lora_magnitude_vector.weight",
    "lora.down.weight", "lora.up.weight", "lora_linear_layer.down.weight", "lora_linear_layer.up.weight",
], key=len, reverse=True)
_KOHYA_NAME = re.compile(r"^(lora_unet|lora_te1|lora_te2|lora_te|lycoris)_([^.]+)$")
# diffusers' attention-processor spelling: ``….attn1.processor.to_q_lora.down.weight``.
_PROCESSOR_KEY = re.compile(r"^(.+\.processor\.(?:to_q|to_k|to_v|to_out))_lora\.(down|up)\.weight$")
# Normalisation layers as kohya-style names end: GroupNorm/LayerNorm of resnets, transformers and CLIP, both layouts.
_NORM_NAME = re.compile(r"_(?:norm\d?|norm_out|in_layers_0|out_layers_0|out_0|layer_norm\d|final_layer_norm)$")
_ALGORITHMS = (  # (algorithm, parts that name it), asked in order
    ("LoHa", ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")),
    ("LoKr", ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")),
    ("full diff", ("diff", "diff_b")),
    ("norm diff", ("w_norm", "b_norm")),
    ("OFT", ("oft_blocks", "oft_diag", "rescale")),
    ("GLoRA", ("a1.weight", "a2.weight", "b1.weight", "b2.weight")),
    ("IA3", ("on_input", "weight")),
    ("set weight", ("set_weight",)),
    ("LoRA", ("lora_down.weight", "lora_up.weight", "lora_mid.weight", "lora_A.weight", "lora_B.weight",
              "lora.down.weight", "lora.up.weight", "lora_linear_layer.down.weight", "lora_linear_layer.up.weight",
              "processor_lora.down.weight", "processor_lora.up.weight")),
)
_SHARED_PARTS = {"alpha", "dora_scale", "lora_magnitude_vector", "lora_magnitude_vector.weight", "lora_B.bias"}


@dataclass
class FileModule:
    """One layer's keys in a file: its name as the file spells it, the parts (key suffixes) and their shapes, what it
    is (``algorithm``, DoRA or not, ``layer`` kind), and where it sits (``prefix`` of its spelling, ``component`` and
    difflora's ``module_key`` when the name is one difflora places)."""

    name: str
    parts: dict[str, tuple[int, ...]] = field(default_factory=dict)
    keys: list[str] = field(default_factory=list)
    prefix: str = ""
    component: str | None = None
    module_key: str | None = None
    alpha_value: float | None = None

    @property
    def algorithm(self) -> str:
        own = set(self.parts) - _SHARED_PARTS
        for algorithm, parts in _ALGORITHMS:
            if own and own <= set(parts):
                return algorithm + (" (Tucker)" if "lora_mid.weight" in own else "")
        return "unknown"

    @property
    def dora(self) -> bool:
        return bool({"dora_scale", "lora_magnitude_vector", "lora_magnitude_vector.weight"} & set(self.parts))

    @property
    def kind(self) -> str:
        """``LoRA``, ``LoHa+DoRA``, …: the algorithm and DoRA, as reports group modules."""
        return self.algorithm + ("+DoRA" if self.dora else "")

    @property
    def layer(self) -> str:
        """``linear`` or ``conv KxK`` as far as the file's shapes tell (LoHa/LoKr may hold a conv as a matrix)."""
        for part in ("lora_mid.weight", "hada_t1", "lokr_t2", "lokr_w2", "diff", "lora_down.weight", "lora_A.weight"):
            shape = self.parts.get(part)
            if shape is not None and len(shape) == 4:
                return f"conv {shape[2]}x{shape[3]}"
        return "linear"

    @property
    def norm_layer(self) -> bool:
        """Whether the name is a normalisation layer's (LyCORIS' ``w_norm``/``b_norm`` target them), which difflora
        does not place but the tools' key maps hold (every weight of the UNet; CLIP's layer norms for A1111)."""
        return self.module_key is None and bool(_NORM_NAME.search(self.name))

    @property
    def layer_name(self) -> str:
        """The module's path without its component (``down_blocks.0.resnets.0.conv1``), or its file name."""
        return self.module_key.partition(".")[2] if self.module_key else self.name


def _split_part(key: str) -> tuple[str, str]:
    """``(module name, part)`` of a key: ``lora_unet_x.lora_down.weight`` → ``("lora_unet_x", "lora_down.weight")``."""
    processor = _PROCESSOR_KEY.match(key)
    if processor:
        return processor.group(1), f"processor_lora.{processor.group(2)}.weight"
    for part in _PARTS:
        if key.endswith("." + part):
            return key[: -len(part) - 1], part
    name, _, part = key.rpartition(".")
    return (name, part) if name else (key, "")


def _place(module: FileModule) -> None:
    """Fill in ``prefix``, ``component`` and ``module_key`` from the module's name."""
    kohya = _KOHYA_NAME.match(module.name)
    if kohya:
        module.prefix, flat = kohya.groups()
        component = {"lora_unet": "unet", "lycoris": "unet", "lora_te2": "text_encoder_2"}.get(module.prefix,
                                                                                              "text_encoder")
        path = unet_layer_path(flat) if component == "unet" else text_layer_path(flat)
        module.component = component
        module.module_key = join_module_key(component, path) if path else None
        return
    name = module.name.removeprefix("base_model.model.")
    first, _, rest = name.partition(".")
    if first in ("diffusion_model", "text_encoders"):  # ComfyUI's own names
        module.prefix, module.component = first, "unet" if first == "diffusion_model" else None
        return
    module.prefix = "diffusers"
    if first in COMPONENTS:
        component, path = first, rest
    elif name.startswith(("down_blocks.", "mid_block.", "up_blocks.")):
        component, path = "unet", name
    else:
        module.component = None
        return
    path = path.removeprefix("text_model.").replace(".processor.", ".")
    module.component = component
    module.module_key = join_module_key(component, path + (".0" if path.endswith(".to_out") else ""))


def file_modules(tensors: Mapping[str, torch.Tensor]) -> list[FileModule]:
    """The file's keys grouped by the layer they name, in file order, each placed (:class:`FileModule`)."""
    modules: dict[str, FileModule] = {}
    for key, tensor in tensors.items():
        name, part = _split_part(key)
        module = modules.setdefault(name, FileModule(name))
        module.parts[part] = tuple(tensor.shape)
        module.keys.append(key)
        if part == "alpha" and tensor.numel() == 1 and not tensor.is_complex():
            module.alpha_value = float(tensor.item())
    for module in modules.values():
        _place(module)
    return list(modules.values())


# ----- what a tool does with them -----------------------------------------------------------------------------------


@dataclass
class ToolReport:
    """What one tool does with a file: whether it loads it (``failure`` says why not) and, per outcome, algorithm,
    layer kind and reason, how many modules (``groups``). :func:`difflora.reports.compat_lines` words it."""

    tool: str
    target: str
    total: int
    failure: str | None = None
    groups: dict[tuple[str, str, str, str], int] = field(default_factory=dict)
    outcomes: dict[str, str] = field(default_factory=dict)  # module name → outcome, for tests and --json

    @property
    def loads(self) -> bool:
        return self.failure is None

    def count(self, outcome: str) -> int:
        return sum(n for (kind, *_), n in self.groups.items() if kind == outcome) if self.loads else 0

    @property
    def applied(self) -> int:
        """Modules the tool changes the model with, exactly or not; 0 when it refuses the file."""
        return self.count(APPLIES) + self.count(DIFFERS)

    def note(self, module: FileModule, outcome: str, reason: str = "") -> None:
        group = (outcome, module.kind, module.layer, reason)
        self.groups[group] = self.groups.get(group, 0) + 1
        self.outcomes[module.name] = outcome

    def fail(self, reason: str) -> None:
        if self.failure is None:
            self.failure = reason

    def as_dict(self) -> dict:
        return {
            "tool": self.tool, "target": self.target, "loads": self.loads, "failure": self.failure,
            "modules": self.total, "applied": self.applied, "differs": self.count(DIFFERS),
            "ignored": self.total - self.applied,
            "groups": [{"outcome": outcome, "algorithm": kind, "layer": layer, "reason": reason, "modules": count}
                       for (outcome, kind, layer, reason), count in sorted(self.groups.items())],
        }


def _is_sdxl(modules: list[FileModule], header: Mapping[str, str]) -> bool:
    """Whether the file is for SDXL: a second text encoder, original-layout UNet names, or its header says so."""
    if any(module.component == "text_encoder_2" or module.prefix == "lora_te1" for module in modules):
        return True
    if any(re.match(r"lora_unet_(input_blocks|middle_block|output_blocks)_", module.name) for module in modules):
        return True
    architecture = f"{header.get('modelspec.architecture', '')} {header.get('ss_base_model_version', '')}".lower()
    return "xl" in architecture


def _weights(module: FileModule, state: AdapterState) -> ModuleWeights | None:
    return state.modules.get(module.module_key) if module.module_key else None


# ----- diffusers ----------------------------------------------------------------------------------------------------

_KOHYA_PREFIXES = ("lora_te_", "lora_unet_", "lora_te1_", "lora_te2_")
_DIFFUSERS_KOHYA_PARTS = {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"}
_ORIGINAL_LAYOUT = re.compile(r"lora_unet_(input_blocks|middle_block|output_blocks)_")


def _kohya_scales_diffusers_reads(modules: list[FileModule]) -> dict[str, float]:
    """The scale diffusers gives each kohya LoRA module. ``get_peft_kwargs`` builds one ``LoraConfig`` per component
    from the commonest alpha plus an ``alpha_pattern`` of the others, but names the attention projections' entries
    after their converted keys (``….processor.to_q_lora…``, ``….self_attn.to_q_lora…``), which match no module: an
    attention projection gets the commonest alpha of its component over its own rank, every other layer its own
    alpha (the commonest when it has none). Ranks are always right (``rank_pattern`` uses the module names)."""
    scales: dict[str, float] = {}
    for component in COMPONENTS:
        members = [m for m in modules if m.component == component and "lora_down.weight" in m.parts]
        alphas = [m.alpha_value for m in members if m.alpha_value is not None]
        common = collections.Counter(alphas).most_common(1)[0][0] if alphas else None
        for member in members:
            rank = member.parts["lora_down.weight"][0]
            attention = member.module_key is not None and split_projection(member.module_key) is not None
            own = member.alpha_value if member.alpha_value is not None else common
            alpha = common if attention else own
            scales[member.name] = (alpha if alpha is not None else rank) / rank
    return scales


def _diffusers(modules: list[FileModule], header: Mapping[str, str], state: AdapterState, sdxl: bool) -> ToolReport:
    report = ToolReport("diffusers", "0.42 load_lora_weights, " + ("SDXL pipeline" if sdxl else "SD 1.x pipeline"),
                        len(modules))
    components = COMPONENTS if sdxl else COMPONENTS[:2]
    keys = [key for module in modules for key in module.keys if "dora_scale" not in key]
    if all(key.startswith(_KOHYA_PREFIXES) for key in keys):
        _diffusers_kohya(report, modules, state, sdxl, components)
        return report
    if any("lora" not in key for key in keys):
        report.fail("a key without 'lora' in its name (Invalid LoRA checkpoint)")
    for module in modules:
        if module.prefix != "diffusers" or module.component is None:
            report.note(module, IGNORES, "not read: kohya/ComfyUI names in a file that mixes layouts"
                        if module.prefix != "diffusers" else "names no pipeline component")
        elif module.component not in components:
            report.note(module, IGNORES, f"the pipeline has no {module.component}")
        elif module.algorithm != "LoRA":
            report.note(module, IGNORES, "not a LoRA")
        else:
            report.note(module, APPLIES)
    return report


def _diffusers_kohya(report: ToolReport, modules: list[FileModule], state: AdapterState, sdxl: bool,
                     components: tuple[str, ...]) -> None:
    for module in modules:
        extra = set(module.parts) - _DIFFUSERS_KOHYA_PARTS
        if extra or not {"lora_down.weight", "lora_up.weight"} <= set(module.parts):
            part = sorted(extra)[0] if extra else "a lone half of a LoRA"
            report.fail(f"{module.kind} ({part}) is not converted: ValueError")
    # _maybe_map_sgm_blocks_to_diffusers drops the original-layout keys when any key names a diffusers block
    mixed = sdxl and any(_ORIGINAL_LAYOUT.match(m.name) for m in modules) and any(
        block in m.name for m in modules for block in ("down_blocks", "mid_block", "up_blocks"))
    scales = _kohya_scales_diffusers_reads(modules)
    for module in modules:
        weights = _weights(module, state)
        if module.algorithm != "LoRA":
            report.note(module, IGNORES, "not converted")
        elif module.component not in components:
            report.note(module, IGNORES, f"the pipeline has no {module.component}")
        elif mixed and _ORIGINAL_LAYOUT.match(module.name):
            report.note(module, IGNORES, "original-layout names dropped: the file mixes both layouts")
        elif (not sdxl and _ORIGINAL_LAYOUT.match(module.name)) or weights is None:
            report.note(module, IGNORES, "names no layer of the model")
        elif module.name.startswith("lora_unet_add_embedding_"):
            report.note(module, IGNORES, "add_embedding_linear_N is not converted (only label_emb_0_N is)")
        elif module.layer_name == "text_projection" and module.component == "text_encoder":
            report.note(module, IGNORES, "text_projection: no such layer in CLIPTextModel")
        elif module.dora:
            report.note(module, DIFFERS, "DoRA magnitude dropped with a warning (applied as plain LoRA)")
        elif not _same(scales.get(module.name), weights.scale):
            report.note(module, DIFFERS, f"scale {scales[module.name]:g} instead of {weights.scale:g} "
                        "(per-module ranks/alphas folded into one LoraConfig)")
        else:
            report.note(module, APPLIES)


def _same(first: float | None, second: float) -> bool:
    return first is not None and abs(first - second) <= 1e-6 * max(1.0, abs(second))


# ----- ComfyUI and Forge --------------------------------------------------------------------------------------------

_CLIP_LAYER = re.compile(r"^encoder\.layers\.\d+\.(?:self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12])$")
_COMFY_ALGORITHMS = {"LoRA", "LoRA (Tucker)", "LoHa", "LoKr", "full diff", "norm diff", "OFT", "GLoRA", "set weight"}
_FORGE_ALGORITHMS = _COMFY_ALGORITHMS - {"OFT"}
_A1111_ALGORITHMS = {"LoRA", "LoRA (Tucker)", "LoHa", "LoKr", "full diff", "norm diff", "OFT", "GLoRA", "IA3"}


def _comfy_name_problem(module: FileModule, sdxl: bool, forge: bool) -> str | None:
    """Why ComfyUI's (or Forge's) key maps hold no entry for the module's name; ``None`` when they do."""
    path = module.layer_name
    if module.prefix in ("lora_unet", "lycoris"):
        unplaced = module.module_key is None and not (module.norm_layer and module.prefix == "lora_unet")
        if unplaced or (module.prefix == "lycoris" and _ORIGINAL_LAYOUT.match("lora_unet_" + module.name[8:])):
            return "names no layer of the model"
        return None
    if module.prefix in ("lora_te", "lora_te1", "lora_te2"):
        if module.component == "text_encoder_2" and not sdxl:
            return "the model has no second text encoder"
        if module.module_key is None or "_text_model_" not in module.name and path != "text_projection":
            return "names no CLIP layer ComfyUI maps"
        if path == "text_projection":
            return None if module.prefix in ("lora_te1", "lora_te2") else "lora_te_text_projection is not mapped"
        return None if _CLIP_LAYER.match(path) else "names no CLIP layer ComfyUI maps"
    if module.prefix == "diffusion_model":
        return None
    if module.prefix == "text_encoders":
        return "text_encoders.… names are not mapped" if forge else None
    if module.prefix != "diffusers" or module.component is None:
        return "names no layer ComfyUI maps"
    if module.name.startswith("base_model.model."):
        return "PEFT's base_model.model. names are not mapped for Stable Diffusion"
    if module.component == "unet":
        if split_projection(path) and ".processor." not in module.name:
            return "PEFT attention names (….to_q.lora_A) are not mapped, only ….processor.to_q"
        return None
    if module.component == "text_encoder_2" and not sdxl:
        return "the model has no second text encoder"
    if ".text_model." not in module.name or not _CLIP_LAYER.match(path):
        return "names no CLIP layer ComfyUI maps (…text_model.encoder.layers.N.…)"
    return None


def _dora_on_output(module: FileModule, weights: ModuleWeights | None) -> bool:
    if weights is not None and weights.dora_scale is not None:
        return weights.wd_on_output
    shape = module.parts.get("dora_scale", ())
    return not (len(shape) >= 2 and shape[0] == 1)


def _comfy_outcome(module: FileModule, weights: ModuleWeights | None, algorithms: set[str]) -> tuple[str, str]:
    if module.algorithm not in algorithms:
        return IGNORES, f"{module.algorithm} is not read"
    if "lora_magnitude_vector" in module.parts or "lora_magnitude_vector.weight" in module.parts:
        return DIFFERS, "PEFT's lora_magnitude_vector is not read (plain LoRA)"
    if module.dora and _dora_on_output(module, weights):
        return DIFFERS, "DoRA per output row normalised by ‖W‖, not ‖W + ΔW‖"
    file_scale_is_one = module.algorithm.startswith("LoRA") and module.alpha_value is None
    if file_scale_is_one and weights is not None and not _same(1.0, weights.scale):
        return DIFFERS, f"scale 1 instead of {weights.scale:g} (lora_adapter_metadata is not read)"
    return APPLIES, ""


def _comfyui(modules: list[FileModule], state: AdapterState, sdxl: bool, forge: bool = False) -> ToolReport:
    target = "SDXL" if sdxl else "SD 1.x"
    report = ToolReport("Forge" if forge else "ComfyUI", f"{target}, {'dfdcbab' if forge else 'comfy/lora.py 2025'}",
                        len(modules))
    unplaced_keys = 0
    for module in modules:
        problem = _comfy_name_problem(module, sdxl, forge)
        if problem:
            report.note(module, IGNORES, problem)
            unplaced_keys += len(module.keys)
            continue
        outcome, reason = _comfy_outcome(module, _weights(module, state), _FORGE_ALGORITHMS if forge
                                         else _COMFY_ALGORITHMS)
        report.note(module, outcome, reason)
        if outcome == IGNORES:
            unplaced_keys += len(module.keys)
        elif "lora_magnitude_vector" in module.parts or "lora_magnitude_vector.weight" in module.parts:
            unplaced_keys += 1
    if forge and unplaced_keys > _FORGE_UNMATCHED_LIMIT:
        report.fail(f"{unplaced_keys} keys match no layer (over {_FORGE_UNMATCHED_LIMIT}: 'LoRA version mismatch')")
    return report


# ----- AUTOMATIC1111 ------------------------------------------------------------------------------------------------


def _a1111_name_problem(module: FileModule, sdxl: bool, names: set[str]) -> str | None:
    """Why A1111's ``load_network`` finds no layer for the module's name; ``None`` when it does."""
    path = module.layer_name
    if module.prefix == "lora_unet":
        if module.norm_layer:
            return None
        if module.module_key is None:
            return "names no layer of the model"
        if sdxl and not _ORIGINAL_LAYOUT.match(module.name) and (path.startswith("up_blocks.0.upsamplers")
                                                                  or path.startswith("add_embedding")):
            return "diffusers-style name converted with SD 1.x block arithmetic: no such SDXL layer"
        return None
    if module.prefix in ("lora_te", "lora_te1", "lora_te2"):
        if module.component == "text_encoder_2" and not sdxl:
            return "the model has no second text encoder"
        if module.norm_layer and "_text_model_encoder_layers_" in module.name:
            return None
        if module.module_key is None or "_text_model_encoder_layers_" not in module.name:
            return "names no CLIP layer A1111 maps" + (" (text_projection)" if path == "text_projection" else "")
        if module.component == "text_encoder_2" and ".self_attn." in path:
            layer = module.name.rsplit("_self_attn_", 1)[0]
            if not all(f"{layer}_self_attn_{p}_proj" in names for p in ("q", "k", "v", "out")):
                return "CLIP-G attention is applied only with q, k, v and out_proj together"
        return None
    if module.prefix == "diffusers":
        return "diffusers/PEFT names are not read for SD 1.x/SDXL"
    return f"{module.prefix or 'these'} names are not read"


def _a1111(modules: list[FileModule], state: AdapterState, sdxl: bool) -> ToolReport:
    report = ToolReport("A1111", ("SDXL" if sdxl else "SD 1.x") + ", 1.10 Lora extension", len(modules))
    names = {module.name for module in modules}
    for module in modules:
        problem = _a1111_name_problem(module, sdxl, names)
        if problem:
            report.note(module, IGNORES, problem)
        elif module.algorithm not in _A1111_ALGORITHMS:
            report.fail(f"no module type accepts {module.kind} keys ({', '.join(sorted(module.parts))})")
            report.note(module, IGNORES, "no module type accepts its keys")
        elif module.dora and _dora_on_output(module, _weights(module, state)):
            report.note(module, DIFFERS, "DoRA normalised per input column, the file's magnitude is per output row")
        else:
            report.note(module, APPLIES)
    return report


# ----- all of them --------------------------------------------------------------------------------------------------


def compat_report(tensors: Mapping[str, torch.Tensor], header: Mapping[str, str],
                  state: AdapterState) -> list[ToolReport]:
    """What diffusers, ComfyUI, AUTOMATIC1111 and Forge each do with a file: its raw ``tensors`` and ``header`` (as
    :func:`~difflora.formats._common.read_safetensors` returns them) and the ``state`` difflora read from them (for
    the scales and DoRA axes difflora applies). The model is Stable Diffusion 1.x, or SDXL when the file is
    (a second text encoder, original-layout names, or its header says so)."""
    modules = file_modules(tensors)
    sdxl = _is_sdxl(modules, header)
    return [_diffusers(modules, header, state, sdxl), _comfyui(modules, state, sdxl),
            _a1111(modules, state, sdxl), _comfyui(modules, state, sdxl, forge=True)]
