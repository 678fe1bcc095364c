"""Training options: one dataclass is the single source of every option's name, type, default and help.

The command line (``difflora train``, ``python -m difflora.train``, ``accelerate launch train/train_lora.py``), YAML
config files and the metadata written into the adapter are all generated from :class:`TrainConfig`.
Precedence: defaults < ``--config FILE.yaml`` < flags on the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from ..errors import InvalidArgumentError

__all__ = ["TrainConfig", "build_arg_parser", "config_from_args", "load_config_file", "make_config", "config_to_dict"]


def _option(default, help: str, choices: tuple | None = None):
    metadata = {"help": help, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """Everything a training run needs. Field names are the option names (``--batch-size`` ↔ ``batch_size``)."""

    # What to train on and where to write
    model: str = _option("embedded", "base model: 'embedded', a diffusers folder, a .safetensors checkpoint or a hub id")
    model_config: str | None = _option(None, "architecture for a single-file checkpoint (diffusers folder or hub id)")
    data: str | None = _option(None, "image folder (kohya .txt captions, N_name repeat folders) or HF imagefolder with metadata.jsonl")
    output: str = _option("outputs/lora", "output folder: the adapter, config.yaml, checkpoints/, logs/, validation/")
    name: str = _option("lora", "adapter name; the adapter is written to OUTPUT/NAME.safetensors")
    # Data
    resolution: int = _option(64, "training resolution (side of the square area; multiple of 8)")
    center_crop: bool = _option(True, "center crop (off: random crop)")
    random_flip: bool = _option(False, "random horizontal flip")
    caption: str | None = _option(None, "caption for images that have none")
    trigger_word: str | None = _option(None, "word put in front of every caption")
    caption_dropout: float = _option(0.0, "probability that a caption is dropped (trains unconditional guidance too)")
    shuffle_captions: bool = _option(False, "shuffle comma-separated tags of each caption")
    keep_tokens: int = _option(0, "leading tags kept in place when shuffling")
    buckets: bool = _option(True, "aspect-ratio buckets (each batch from one bucket)")
    # Length and batch
    steps: int | None = _option(200, "optimizer steps to train (wins over --epochs when both are given)")
    epochs: int | None = _option(None, "epochs to train when --steps is not given")
    batch_size: int = _option(4, "images per batch per process")
    gradient_accumulation: int = _option(1, "batches per optimizer step")
    # The adapter
    rank: int = _option(4, "LoRA rank")
    alpha: float | None = _option(None, "LoRA alpha (default: rank, i.e. scale 1)")
    use_rslora: bool = _option(False, "rsLoRA scaling alpha/sqrt(rank)")
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
    prediction_type: str | None = _option(None, "epsilon or v_prediction (default: the scheduler's)", choices=(None, "epsilon", "v_prediction"))
    # Speed
    mixed_precision: str = _option("no", "mixed precision", choices=("no", "fp16", "bf16"))
    gradient_checkpointing: bool = _option(False, "recompute activations in the backward pass to save memory")
    cache_latents: bool = _option(True, "encode each image with the VAE once (not with random crop/flip)")
    cache_dir: str | None = _option(None, "folder for a disk latent cache kept across runs (default: memory)")
    cache_text_encoder_outputs: bool = _option(True, "encode each caption once while the text encoder is frozen")
    dataloader_workers: int = _option(0, "data-loader worker processes")
    # Runs that survive
    seed: int = _option(0, "seed for noise, timesteps, data order and initialisation")
    checkpointing_steps: int = _option(0, "save a resumable checkpoint every N steps (0: only on Ctrl-C and at the end)")
    checkpoints_total_limit: int | None = _option(3, "keep at most this many checkpoints")
    resume: str | None = _option(None, "resume from 'latest' or a checkpoint folder")
    # Seeing progress
    validation_prompts: list[str] = _option([], "prompts rendered every --validation-steps into a grid PNG (repeatable)")
    validation_steps: int = _option(0, "render validation images every N steps (0: only at the end)")
    validation_seed: int = _option(0, "seed of the validation images")
    validation_inference_steps: int = _option(20, "denoising steps of the validation images")
    report_to: str = _option("tensorboard", "where to log", choices=("tensorboard", "none"))
    log_every: int = _option(1, "log loss/lr/grad norm every N steps")

    def validate(self) -> None:
        """Raise :class:`InvalidArgumentError` naming the option when a value cannot be used."""
        positive = ("resolution", "batch_size", "gradient_accumulation", "rank", "validation_inference_steps", "log_every")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise InvalidArgumentError(f"{_flag(name)} must be a positive integer, got {value!r}")
        if self.resolution % 8:
            raise InvalidArgumentError(f"--resolution must be a multiple of 8, got {self.resolution}")
        if self.steps is None and self.epochs is None:
            raise InvalidArgumentError("give --steps or --epochs")
        for name in ("steps", "epochs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise InvalidArgumentError(f"{_flag(name)} must be a positive integer, got {value!r}")
        for name in ("lr", "loraplus_ratio"):
            if not getattr(self, name) > 0:
                raise InvalidArgumentError(f"{_flag(name)} must be > 0, got {getattr(self, name)!r}")
        if self.text_encoder_lr is not None and not self.text_encoder_lr > 0:
            raise InvalidArgumentError(f"--text-encoder-lr must be > 0, got {self.text_encoder_lr!r}")
        if self.alpha is not None and not self.alpha > 0:
            raise InvalidArgumentError(f"--alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise InvalidArgumentError(f"--caption-dropout must be in [0, 1], got {self.caption_dropout!r}")
        for name in ("keep_tokens", "lr_warmup_steps", "checkpointing_steps", "validation_steps", "dataloader_workers"):
            if getattr(self, name) < 0:
                raise InvalidArgumentError(f"{_flag(name)} must be >= 0, got {getattr(self, name)!r}")
        if self.snr_gamma is not None and not self.snr_gamma > 0:
            raise InvalidArgumentError(f"--snr-gamma must be > 0, got {self.snr_gamma!r}")
        if not (self.train_unet or self.train_text_encoder):
            raise InvalidArgumentError("nothing to train: --no-train-unet needs --train-text-encoder")
        if not self.name or "/" in self.name or "." in self.name:
            raise InvalidArgumentError(f"--name {self.name!r} must be a plain name (no dots or slashes)")
        if self.data is None:
            raise InvalidArgumentError("--data is required (a folder of images with captions)")
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                shown = ", ".join(str(c) for c in choices if c is not None)
                raise InvalidArgumentError(f"{_flag(f.name)} {getattr(self, f.name)!r} is not one of {shown}")


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
    """Add one flag per :class:`TrainConfig` field (``--flag`` / ``--no-flag`` for booleans) and ``--config``."""
    parser = parser or argparse.ArgumentParser(prog="difflora train", description="Train a LoRA style adapter.")
    parser.add_argument("--config", default=None, metavar="FILE.yaml", help="YAML file of options (flags override it)")
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        kind, is_list = _scalar(hints[f.name])
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        help_text = f"{f.metadata['help']} (default: {default})"
        flag = _flag(f.name)
        # Defaults stay unset here (SUPPRESS) so that a config file can tell "given" from "default".
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        elif is_list:
            parser.add_argument(flag.rstrip("s") if flag.endswith("prompts") else flag, dest=f.name, action="append",
                                type=kind, default=argparse.SUPPRESS, help=help_text + "; repeatable")
        else:
            choices = [c for c in (f.metadata.get("choices") or ()) if c is not None] or None
            parse = _parse_optional(kind) if _is_optional(hints[f.name]) else kind
            parser.add_argument(flag, dest=f.name, type=parse, default=argparse.SUPPRESS,
                                choices=choices, help=help_text)
    return parser


def load_config_file(path: str | Path) -> dict:
    """The options of a YAML file as a dict, keys checked against :class:`TrainConfig` (``-`` or ``_`` accepted)."""
    path = Path(path)
    if not path.is_file():
        raise InvalidArgumentError(f"--config {path}: no such file")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise InvalidArgumentError(f"--config {path}: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(loaded, dict):
        raise InvalidArgumentError(f"--config {path}: expected a mapping of option: value")
    known = {f.name for f in fields(TrainConfig)}
    options = {}
    for key, value in loaded.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise InvalidArgumentError(f"--config {path}: unknown option {key!r}")
        options[name] = value
    if "validation_prompts" in options and isinstance(options["validation_prompts"], str):
        options["validation_prompts"] = [options["validation_prompts"]]
    # Relative data/output paths in a config file are relative to the file, so a config works from any folder.
    for name in ("data", "output", "cache_dir"):
        if isinstance(options.get(name), str) and not Path(options[name]).expanduser().is_absolute():
            options[name] = str((path.parent / options[name]).resolve())
    return options


def config_from_args(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> TrainConfig:
    """Defaults < ``--config`` file < flags; validated."""
    parser = build_arg_parser(parser)
    namespace = vars(parser.parse_args(argv))
    config_file = namespace.pop("config", None)
    options = load_config_file(config_file) if config_file else {}
    options.update(namespace)
    return make_config(options)


def make_config(options: dict) -> TrainConfig:
    """A validated :class:`TrainConfig` from a dict of options (YAML file, flags, or the web UI's form)."""
    options = dict(options)
    if options.get("epochs") is not None and "steps" not in options:
        options["steps"] = None  # --epochs alone means train by epochs, not the default step count
    hints = typing.get_type_hints(TrainConfig)
    for name, value in options.items():
        kind, is_list = _scalar(hints[name])
        if value is None or is_list:
            continue
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            options[name] = float(value)
        elif not isinstance(value, kind):
            raise InvalidArgumentError(f"{_flag(name)} must be {kind.__name__}, got {value!r}")
    config = TrainConfig(**options)
    config.validate()
    return config


def config_to_dict(config: TrainConfig) -> dict:
    return dataclasses.asdict(config)
