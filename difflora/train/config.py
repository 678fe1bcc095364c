"""Training options: dataclasses are the single source of every option's name, type, default and help.

:class:`TrainConfig` holds the run's options and a :class:`~difflora.data.DataConfig` (``dataset``) for the data's;
the adapter's options (``algo``, ``targets``, ``rank``, ``dora``, …) take their default and help from
:class:`~difflora.runtime.AdapterOptions`, which :meth:`TrainConfig.adapter_options` builds for ``create_adapter``.
On the command line (``difflora train``, ``python -m difflora.train``, ``accelerate launch train/train_lora.py``), in
YAML config files and in the metadata written into the adapter, the options are one flat list: ``--resolution``,
``caption_dropout:``, ``--data`` (the data's ``data_dir``). Precedence: defaults < ``--config FILE.yaml`` < flags.

A field's metadata holds its ``help``, its ``choices`` and whether it shapes the result: ``shapes_result=False``
marks options that change where a run writes, how long it runs or what it shows, but not what it computes (a
resumed run may change those without a warning).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from ..data import DataConfig
from ..errors import InvalidArgumentError, first_line, number_in, seed_number
from ..generate import MAX_STEPS
from ..runtime import AdapterOptions

__all__ = [
    "Option", "TrainConfig", "build_arg_parser", "config_from_args", "config_options", "config_to_dict",
    "load_config_file", "make_config",
]


def _option(default, help: str, choices: tuple | None = None, *, shapes_result: bool = True):
    metadata = {"help": help, "choices": choices, "shapes_result": shapes_result}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def _adapter_option(name: str):
    """The option ``name`` of :class:`~difflora.runtime.AdapterOptions`: its default, help and choices, from there."""
    source = next(f for f in fields(AdapterOptions) if f.name == name)
    return _option(source.default, source.metadata["help"], source.metadata["choices"])


# The ranges of the numeric options: name → (low, high, kind); kind "int" for an integer, "number" for a finite
# number in [low, high], "above" for one in (low, high]. An unset optional option (None) is not checked.
# Learning rates: AdamW diverges long before 1 (LoRA trains at 1e-5–1e-3). Alpha: alpha/rank is the scale, and past
# 10000 no rank gives a usable one. LoRA+ ratio and Min-SNR γ: 16 and 5 in their papers, 1000 past any use. Noise
# offset: 0.05–0.1 in use; 1 already shifts every latent by a whole standard deviation. Weight decay: a share of the
# weight per step. Gradient clipping: any finite norm (0: off); 1e6 never clips what a finite loss produces.
# Rank: past the smaller side of a layer a rank adds nothing, and 1280 is the widest such side in SD 1.x/2.x/XL
# (SDXL's 1280-wide blocks and second text encoder); beyond it the factors only fill memory. Batch size: the batch is
# held and back-propagated at once, 256 images is past what a GPU holds at SD's sizes; more is --gradient-accumulation
# (at most 1000 batches per step). Validation steps: generate's limit (schedulers know 1000 timesteps). Data loader
# workers: processes, 64 is past any machine's use for image decoding. Step and epoch counts, intervals and the
# checkpoint limit: 10⁹, past any run (years at a step a millisecond) while keeping every count a plain number.
_COUNT = 10**9
NUMBER_RANGES = {
    "lr": (0.0, 1.0, "above"),
    "text_encoder_lr": (0.0, 1.0, "above"),
    "alpha": (0.0, 10000.0, "above"),
    "conv_alpha": (0.0, 10000.0, "above"),
    "loraplus_ratio": (0.0, 1000.0, "above"),
    "snr_gamma": (0.0, 1000.0, "above"),
    "noise_offset": (0.0, 1.0, "number"),
    "weight_decay": (0.0, 1.0, "number"),
    "max_grad_norm": (0.0, 1e6, "number"),
    "rank": (1, 1280, "int"),
    "conv_rank": (1, 1280, "int"),
    "batch_size": (1, 256, "int"),
    "gradient_accumulation": (1, 1000, "int"),
    "validation_inference_steps": (1, MAX_STEPS, "int"),
    "dataloader_workers": (0, 64, "int"),
    "steps": (1, _COUNT, "int"),
    "epochs": (1, _COUNT, "int"),
    "log_every": (1, _COUNT, "int"),
    "lr_warmup_steps": (0, _COUNT, "int"),
    "checkpointing_steps": (0, _COUNT, "int"),
    "validation_steps": (0, _COUNT, "int"),
    "checkpoints_total_limit": (0, _COUNT, "int"),
}


@dataclass(kw_only=True)
class TrainConfig:
    """Everything a training run needs. Field names are the option names (``--batch-size`` ↔ ``batch_size``);
    ``dataset`` holds the data options, whose seed is the run's ``seed``."""

    # What to train on and where to write
    model: str = _option("embedded",
                         "base model: 'embedded', a diffusers folder, a .safetensors checkpoint or a hub id")
    model_config: str | None = _option(None, "architecture for a single-file checkpoint (diffusers folder or hub id)")
    dataset: DataConfig = field(metadata={"help": "the data options (flat: --data, --resolution, …)"})
    output: str = _option("outputs/lora", "output folder: the adapter, config.yaml, checkpoints/, logs/, validation/",
                          shapes_result=False)
    name: str = _option("lora", "adapter name; the adapter is written to OUTPUT/NAME.safetensors")
    # Length and batch
    steps: int | None = _option(200, "optimizer steps to train (wins over --epochs when both are given)",
                                shapes_result=False)
    epochs: int | None = _option(None, "epochs to train when --steps is not given", shapes_result=False)
    batch_size: int = _option(4, "images per batch per process")
    gradient_accumulation: int = _option(1, "batches per optimizer step")
    # The adapter (runtime.AdapterOptions holds these options' defaults and help)
    algo: str = _adapter_option("algo")
    targets: str = _adapter_option("targets")
    rank: int = _adapter_option("rank")
    alpha: float | None = _adapter_option("alpha")
    conv_rank: int | None = _adapter_option("conv_rank")
    conv_alpha: float | None = _adapter_option("conv_alpha")
    dora: bool = _adapter_option("dora")
    lokr_factor: int = _adapter_option("lokr_factor")
    use_rslora: bool = _adapter_option("use_rslora")
    layout: str = _option("auto", "layout of the adapter file: auto (diffusers' keys for LoRA, LoCon and DoRA, which "
                          "plain diffusers loads; kohya's for LoHa and LoKr), diffusers, kohya (A1111, ComfyUI)",
                          choices=("auto", "diffusers", "kohya"), shapes_result=False)
    train_unet: bool = _option(True, "train a UNet adapter")
    train_text_encoder: bool = _option(False, "train a text-encoder adapter too")
    # Optimisation
    lr: float = _option(1e-4, "learning rate of the UNet adapter")
    text_encoder_lr: float | None = _option(None, "learning rate of the text-encoder adapter (default: --lr)")
    loraplus_ratio: float = _option(1.0, "LoRA+: the B (up) factors learn this many times faster")
    lora_fa: bool = _option(False, "LoRA-FA: freeze the A (down) factors at their random init, train B only")
    optimizer: str = _option("adamw", "optimizer", choices=("adamw", "adamw8bit"))
    weight_decay: float = _option(1e-2, "AdamW weight decay")
    max_grad_norm: float = _option(1.0, "gradient clipping norm (0: off)")
    lr_scheduler: str = _option(
        "constant",
        "learning-rate schedule (diffusers get_scheduler)",
        choices=("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"),
    )
    lr_warmup_steps: int = _option(0, "warm-up steps")
    # Objective
    snr_gamma: float | None = _option(None, "Min-SNR-γ loss weighting (5.0 is the paper's choice; off by default)")
    noise_offset: float = _option(0.0, "noise offset (e.g. 0.05)")
    timestep_sampling: str = _option(
        "stratified",
        "timesteps of a batch: independent uniform draws, or stratified to cover the range evenly (same expected loss, "
        "less variance)",
        choices=("uniform", "stratified"),
    )
    prediction_type: str | None = _option(None, "epsilon or v_prediction (default: the scheduler's)",
                                          choices=(None, "epsilon", "v_prediction"))
    # Speed
    mixed_precision: str = _option("no", "mixed precision", choices=("no", "fp16", "bf16"))
    gradient_checkpointing: bool = _option(False, "recompute activations in the backward pass to save memory")
    cache_latents: bool = _option(True, "encode each image with the VAE once (not with random crop/flip)")
    cache_dir: str | None = _option(None, "folder for a disk latent cache kept across runs (default: memory)",
                                    shapes_result=False)
    cache_text_encoder_outputs: bool = _option(True, "encode each caption once while the text encoder is frozen")
    dataloader_workers: int = _option(
        0, "processes that load the images the latent cache does not serve (0: the main process loads them)",
        shapes_result=False)
    # Runs that survive
    seed: int = _option(0, "seed for noise, timesteps, data order, crops, flips, captions and initialisation")
    checkpointing_steps: int = _option(
        0, "save a resumable checkpoint every N steps (0: only on Ctrl-C and at the end)", shapes_result=False)
    checkpoints_total_limit: int | None = _option(3, "keep at most this many checkpoints", shapes_result=False)
    resume: str | None = _option(None, "resume from 'latest' or a checkpoint folder", shapes_result=False)
    # Seeing progress
    validation_prompts: list[str] = _option(
        [], "prompts rendered every --validation-steps into a grid PNG (repeatable)", shapes_result=False)
    validation_steps: int = _option(0, "render validation images every N steps (0: only at the end)",
                                    shapes_result=False)
    validation_seed: int = _option(0, "seed of the validation images", shapes_result=False)
    validation_inference_steps: int = _option(20, "denoising steps of the validation images", shapes_result=False)
    report_to: str = _option("tensorboard", "where to log", choices=("tensorboard", "none"), shapes_result=False)
    log_every: int = _option(1, "log loss/lr/grad norm every N steps", shapes_result=False)

    def __post_init__(self) -> None:
        if self.dataset.seed != self.seed:  # one seed for the run and its data
            self.dataset = dataclasses.replace(self.dataset, seed=self.seed)

    def validate(self) -> None:
        """Raise :class:`InvalidArgumentError` naming the option (``parameter``) when a value cannot be used."""
        if self.steps is None and self.epochs is None:
            raise InvalidArgumentError("steps must be given when epochs is not", "steps")
        hints = typing.get_type_hints(TrainConfig)
        for name, (low, high, kind) in NUMBER_RANGES.items():
            value = getattr(self, name)
            if value is None and _is_optional(hints[name]):
                continue  # unset: the help says what applies
            number_in(value, low, high, name, name, integer=kind == "int", low_open=kind == "above")
        for name in ("seed", "validation_seed"):
            seed_number(getattr(self, name), name, name)
        self.adapter_options().validate()
        if self.algo != "lora" and (self.loraplus_ratio != 1.0 or self.lora_fa):
            option = "lora_fa" if self.lora_fa else "loraplus_ratio"
            raise InvalidArgumentError(f"{option} applies to algo lora only (its up and down factors), got algo "
                                       f"{self.algo}", option)
        if self.layout == "diffusers" and self.algo != "lora":
            raise InvalidArgumentError(f"layout diffusers holds LoRA, LoCon and DoRA only, not {self.algo}: use "
                                       "layout kohya or auto", "layout")
        if not (self.train_unet or self.train_text_encoder):
            raise InvalidArgumentError("train_text_encoder must be on when train_unet is off (nothing to train)",
                                       "train_text_encoder")
        if not self.name or "/" in self.name or "." in self.name:
            raise InvalidArgumentError(f"name {self.name!r} must be a plain name (no dots or slashes)", "name")
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                shown = ", ".join(str(c) for c in choices if c is not None)
                raise InvalidArgumentError(f"{f.name} {getattr(self, f.name)!r} is not one of {shown}", f.name)
        self.dataset.validate()

    def adapter_options(self) -> AdapterOptions:
        """The adapter this run trains, as :meth:`~difflora.runtime.LoRARuntime.create_adapter` takes it: on the
        trained components, initialised from the run's seed."""
        components = tuple(name for name, on in (("unet", self.train_unet), ("text_encoder", self.train_text_encoder))
                           if on)
        names = {f.name for f in fields(AdapterOptions)} - {"init", "seed", "components"}
        return AdapterOptions(**{name: getattr(self, name) for name in names}, seed=self.seed, components=components)


# ----- the flat list of options -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """One option as the command line and files know it: its flat ``name`` and the dataclass field that holds it
    (a :class:`TrainConfig` field, or a :class:`DataConfig` field when ``in_dataset``)."""

    name: str
    field: dataclasses.Field
    hint: typing.Any
    in_dataset: bool

    @property
    def default(self):
        if self.field.default_factory is not dataclasses.MISSING:
            return self.field.default_factory()
        return None if self.field.default is dataclasses.MISSING else self.field.default

    @property
    def shapes_result(self) -> bool:
        return self.field.metadata.get("shapes_result", True)


@functools.cache
def config_options() -> dict[str, Option]:
    """Every option by its flat name, in ``--help`` order: the run's fields, with the data's in place of ``dataset``.

    A data field is named by its ``option`` metadata, else its own name; one the run also has (``seed``) is the
    run's option.
    """
    run_hints, data_hints = typing.get_type_hints(TrainConfig), typing.get_type_hints(DataConfig)
    run_names = {f.name for f in fields(TrainConfig)}
    found = {}
    for f in fields(TrainConfig):
        if f.name != "dataset":
            found[f.name] = Option(f.name, f, run_hints[f.name], in_dataset=False)
            continue
        for data_field in fields(DataConfig):
            if data_field.name not in run_names:
                name = data_field.metadata.get("option", data_field.name)
                found[name] = Option(name, data_field, data_hints[data_field.name], in_dataset=True)
    return found


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _is_optional(hint) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)


def _scalar(hint) -> tuple[type, bool]:
    """(scalar type, is_list) of a type hint such as ``int | None`` or ``list[str]``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
        origin = typing.get_origin(hint)
    if origin is list:
        return typing.get_args(hint)[0], True
    return hint, False


def _parse_optional(kind: type):
    def parse(text: str):
        if text.lower() in ("none", "null", ""):
            return None
        return kind(text)

    parse.__name__ = kind.__name__
    return parse


def build_arg_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Add one flag per option (``--flag`` / ``--no-flag`` for booleans) and ``--config``."""
    parser = parser or argparse.ArgumentParser(prog="difflora train", description="Train a LoRA style adapter.")
    parser.add_argument("--config", default=None, metavar="FILE.yaml", help="YAML file of options (flags override it)")
    for option in config_options().values():
        kind, is_list = _scalar(option.hint)
        required = option.field.default is dataclasses.MISSING and option.field.default_factory is dataclasses.MISSING
        help_text = option.field.metadata["help"] + ("" if required else f" (default: {option.default})")
        flag = _flag(option.name)
        # Defaults stay unset here (SUPPRESS) so that a config file can tell "given" from "default".
        if kind is bool:
            parser.add_argument(flag, dest=option.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
        elif is_list:
            parser.add_argument(flag.rstrip("s") if flag.endswith("prompts") else flag, dest=option.name,
                                action="append", type=kind, default=argparse.SUPPRESS, help=help_text + "; repeatable")
        else:
            choices = [c for c in (option.field.metadata.get("choices") or ()) if c is not None] or None
            kind = str if kind is Path else kind  # a path stays as typed; DataConfig makes it a Path
            parse = _parse_optional(kind) if _is_optional(option.hint) else kind
            parser.add_argument(flag, dest=option.name, type=parse, default=argparse.SUPPRESS,
                                choices=choices, help=help_text)
    return parser


def load_config_file(path: str | Path) -> dict:
    """The options of a YAML file as a dict, keys checked against the options (``-`` or ``_`` accepted)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InvalidArgumentError(f"config {path}: no such file", "config") from None
    except (OSError, UnicodeDecodeError) as error:  # a folder, a name too long, not UTF-8 text
        reason = error.strerror if isinstance(error, OSError) and error.strerror else first_line(error)
        raise InvalidArgumentError(f"config {path}: cannot be read ({reason})", "config") from None
    try:
        loaded = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise InvalidArgumentError(f"config {path}: not valid YAML ({first_line(error)})", "config") from None
    if not isinstance(loaded, dict):
        raise InvalidArgumentError(f"config {path}: expected a mapping of option: value", "config")
    known = config_options()
    options = {}
    for key, value in loaded.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise InvalidArgumentError(f"config {path}: unknown option {key!r}", "config")
        options[name] = value
    if "validation_prompts" in options and isinstance(options["validation_prompts"], str):
        options["validation_prompts"] = [options["validation_prompts"]]
    # Relative data/output paths in a config file are relative to the file, so a config works from any folder.
    for name in ("data", "output", "cache_dir"):
        if isinstance(options.get(name), str) and not Path(options[name]).expanduser().is_absolute():
            options[name] = str((path.parent / options[name]).resolve())
    return options


def config_from_args(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> TrainConfig:
    """Defaults < ``--config`` file < flags; validated. A value from the file that cannot be used is refused naming
    the file (``config cfg.yaml: 'lr' must be …``, parameter ``config``)."""
    parser = build_arg_parser(parser)
    namespace = vars(parser.parse_args(argv))
    config_file = namespace.pop("config", None)
    from_file = load_config_file(config_file) if config_file else {}
    try:
        return make_config({**from_file, **namespace})
    except InvalidArgumentError as error:
        if error.parameter not in set(from_file) - set(namespace):
            raise
        message = str(error)
        if message.startswith(error.parameter + " "):  # the key as the file spells it, not turned into a flag
            message = repr(error.parameter) + message[len(error.parameter):]
        raise InvalidArgumentError(f"config {config_file}: {message}", "config") from None


def _number_from_text(text: str, kind: type):
    """``text`` as an ``int`` or ``float`` when it spells one, else ``text`` (refused by the type check)."""
    try:
        return kind(text.strip())
    except ValueError:
        return text


def make_config(options: dict) -> TrainConfig:
    """A validated :class:`TrainConfig` from a dict of flat options (YAML file, flags, or the web UI's form)."""
    options = dict(options)
    if options.get("epochs") is not None and "steps" not in options:
        options["steps"] = None  # --epochs alone means train by epochs, not the default step count
    if options.get("data") is None:
        raise InvalidArgumentError("data is required (a folder of images with captions)", "data")
    known = config_options()
    for name, value in options.items():
        if name not in known:
            raise InvalidArgumentError(f"{name!r} is not a training option", name)
        kind, is_list = _scalar(known[name].hint)
        if is_list or (value is None and _is_optional(known[name].hint)):
            continue
        if kind in (int, float) and isinstance(value, str):
            # YAML 1.1 (PyYAML) reads 1e-3 as text: it wants 1.0e-3. Text that is a number of the kind is that number.
            value = options[name] = _number_from_text(value, kind)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            options[name] = float(value)
        elif kind is Path and isinstance(value, (str, os.PathLike)):
            continue
        elif not isinstance(value, kind):
            raise InvalidArgumentError(f"{name} must be {kind.__name__}, got {value!r}", name)
    data_options = {known[name].field.name: options.pop(name) for name in list(options) if known[name].in_dataset}
    config = TrainConfig(dataset=DataConfig(**data_options), **options)
    config.validate()
    return config


def config_to_dict(config: TrainConfig) -> dict:
    """The flat options of ``config`` (what config.yaml, checkpoints and the adapter's metadata hold)."""
    flat = {}
    for name, option in config_options().items():
        value = getattr(config.dataset if option.in_dataset else config, option.field.name)
        flat[name] = str(value) if isinstance(value, Path) else list(value) if isinstance(value, list) else value
    return flat
