"""Models: the embedded tiny Stable Diffusion, and loading any model a user names.

The embedded model is a real Stable Diffusion 1.x architecture (a UNet with cross-attention down, mid and up blocks,
an AutoencoderKL, a CLIP text encoder and tokenizer, an SD 1.5 scheduler) at toy sizes with seeded random weights.
difflora builds it locally, once, into its cache folder: nothing is downloaded, and every machine gets the same
weights. It draws noise, not pictures, but every code path (processors, adapter files, training, UI) runs on it in
seconds on a CPU, and diffusers loads it as it loads any model.

``load_pipeline`` turns whatever a user passes as ``--model`` (the embedded model, a diffusers folder, a single-file
``.safetensors`` checkpoint or a hub id) into a ``StableDiffusionPipeline``, and turns every way that can fail into
one ``ModelLoadError`` line naming the model.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import InvalidArgumentError, ModelLoadError

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

__all__ = [
    "DEFAULT_MODEL",
    "TINY_MODEL_VERSION",
    "build_tiny_model",
    "default_model_dir",
    "ensure_default_model",
    "is_embedded",
    "load_pipeline",
    "resolve_device",
    "resolve_dtype",
]

DEFAULT_MODEL = "embedded"
"""The name users give for the embedded tiny model (``None`` and ``""`` mean it too)."""

TINY_MODEL_VERSION = 1
"""Bumped whenever the embedded model's architecture, tokenizer or weights change, so old caches are rebuilt."""

_MARKER_NAME = "difflora_tiny.json"
_PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")
_MAX_REASON_CHARS = 200

# CLIP's special tokens and its word-end mark.
_START_TOKEN = "<|startoftext|>"
_END_TOKEN = "<|endoftext|>"
_END_OF_WORD = "</w>"
_MAX_TOKENS = 77

# Words the tiny tokenizer learns its merges from: common English and the vocabulary of image prompts, so that the
# words prompts are made of become one token each, as they do with CLIP's real tokenizer. Lowercase letters only,
# because that is what CLIP's pre-tokenizer hands the BPE for a word.
_TOKENIZER_WORDS = """
a an the of in on at to by for from with without and or but not no as is are was be it its this that these those
there here what who which where when how one two three four five many some all every each other another more most
very so too up down out off over under above below into onto through between behind beside near far around along
photo photograph photography picture image painting drawing sketch illustration render rendering portrait landscape
still life style art artwork artist detailed detail details highly high low quality best masterpiece beautiful
pretty cute ugly cinematic film movie shot lighting light lights dark darkness night day morning noon afternoon
evening sunset sunrise dusk dawn sky skies cloud clouds cloudy sun sunny sunlight moon moonlight star stars starry
rain rainy snow snowy fog foggy mist misty storm stormy thunder lightning wind sea ocean lake river stream pond
water wave waves beach shore coast island sand desert dune forest woods jungle tree trees leaf leaves branch flower
flowers rose roses garden field fields meadow grass mountain mountains hill hills valley canyon cliff rock rocks
stone cave volcano ice glacier city cities street streets road path bridge house home cottage cabin castle palace
tower lighthouse church temple village town building buildings skyscraper window windows door room kitchen library
interior exterior wall floor roof table chair bed lamp candle fire smoke cat cats kitten dog dogs puppy fox wolf
bear lion tiger horse cow sheep rabbit mouse bird birds owl eagle duck fish whale shark octopus butterfly bee
dragon unicorn robot monster alien ghost knight wizard witch king queen prince princess warrior soldier pirate
person people man men woman women girl boy child children baby family friend face eyes eye hair hand hands smile
smiling standing sitting walking running flying swimming sleeping reading holding wearing looking dress hat coat
shirt armor crown sword book books car cars train boat ship plane airplane bicycle clock cup coffee tea food fruit
apple bread cake red orange yellow green blue purple violet pink brown black white gray grey gold golden silver
color colors colorful vivid pastel muted watercolor oil acrylic ink pencil charcoal chalk pixel anime manga
cartoon comic digital concept fantasy science fiction futuristic cyberpunk steampunk medieval ancient modern
vintage retro old new young small large big tiny huge giant little tall short long wide narrow round square soft
sharp smooth rough blurry blur noise noisy grain grainy texture pattern geometric abstract surreal realistic
photorealistic minimal minimalist simple complex bright dim warm cold hot cool glowing glow neon shadow shadows
reflection reflections wide angle close closeup view scene background foreground center top bottom left right
trending award winning epic dramatic moody calm peaceful happy sad lonely magical mysterious sks ohwx token
""".split()


# ----- the tokenizer ------------------------------------------------------------------------------------------------


def _byte_symbols() -> list[str]:
    """The 256 symbols byte-level BPE spells bytes with (GPT-2's and CLIP's convention), in CLIP's vocabulary order."""
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet(), key=ord)


def _learn_bpe_merges(words: list[str]) -> list[tuple[str, str]]:
    """Byte-pair merges learned from ``words`` with the ``tokenizers`` library's BPE trainer.

    Words are spelled in byte symbols with ``</w>`` on the last, as CLIP's tokenizer spells them, so the merges
    apply unchanged at tokenization time; the vocabulary is large enough that every listed word becomes one token.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    learner = Tokenizer(models.BPE(end_of_word_suffix=_END_OF_WORD))
    learner.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=4096,
        min_frequency=1,
        initial_alphabet=_byte_symbols(),
        end_of_word_suffix=_END_OF_WORD,
        show_progress=False,
    )
    learner.train_from_iterator([" ".join(words)], trainer=trainer)
    merges = json.loads(learner.to_str())["model"]["merges"]
    return [tuple(merge.split(" ")) if isinstance(merge, str) else tuple(merge) for merge in merges]


@functools.lru_cache(maxsize=1)
def _tokenizer_files() -> dict[str, str]:
    """The tiny CLIP tokenizer as file name → text: ``vocab.json``, ``merges.txt``, ``tokenizer_config.json``.

    The vocabulary is laid out as CLIP's: the 256 byte symbols, the same 256 ending a word, one entry per merge in
    merge order, then the start and end tokens. Plain vocab/merges files rather than only ``tokenizer.json``, so
    that the slow (transformers 4) and the tokenizers-backed (transformers 5) ``CLIPTokenizer`` both read them.
    """
    byte_symbols = _byte_symbols()
    merges = _learn_bpe_merges(_TOKENIZER_WORDS)
    vocab: dict[str, int] = {}
    for token in [*byte_symbols, *(symbol + _END_OF_WORD for symbol in byte_symbols)]:
        vocab[token] = len(vocab)
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    for special in (_START_TOKEN, _END_TOKEN):
        vocab[special] = len(vocab)
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": _MAX_TOKENS,
        "bos_token": _START_TOKEN,
        "eos_token": _END_TOKEN,
        "unk_token": _END_TOKEN,
        "pad_token": _END_TOKEN,  # SD 1.x pads with the end token
    }
    return {
        "vocab.json": json.dumps(vocab, ensure_ascii=False, indent=0) + "\n",
        "merges.txt": "#version: 0.2\n" + "".join(f"{left} {right}\n" for left, right in merges),
        "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
    }


def _write_tokenizer_files(tokenizer_dir: Path) -> None:
    """Write the tiny CLIP tokenizer's files into ``tokenizer_dir`` (created if needed)."""
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    for name, text in _tokenizer_files().items():
        (tokenizer_dir / name).write_text(text, encoding="utf-8")


# ----- the embedded model -------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _library_progress_bars_disabled() -> Iterator[None]:
    """Silence diffusers' and transformers' own progress bars (loading, writing shards) and restore them after."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    restore = []
    for library in (diffusers_logging, transformers_logging):
        if library.is_progress_bar_enabled():
            library.disable_progress_bar()
            restore.append(library.enable_progress_bar)
    try:
        yield
    finally:
        for enable in restore:
            enable()


def build_tiny_model(output_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write the embedded tiny Stable Diffusion 1.x to ``output_dir`` (which must be new or empty); returns it.

    What is written is a plain diffusers folder (``StableDiffusionPipeline.from_pretrained`` loads it offline):
    safetensors weights, configs, a CLIP tokenizer learned here, and ``difflora_tiny.json`` recording
    ``TINY_MODEL_VERSION``. Each component is initialised right after ``torch.manual_seed(seed)``, so a given
    ``seed`` writes byte-identical weights on every machine (the caller's global RNG state is left as it was).
    The folder is built in a temporary sibling and renamed into place at the end, so a crash never leaves a half
    model where a model is expected.

    Raises:
        InvalidArgumentError: ``output_dir`` exists and is not an empty folder.
    """
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    output_dir = Path(output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise InvalidArgumentError(f"{output_dir}: exists and is not an empty folder; give a new folder")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    # A sibling, so the final rename stays on one file system and is atomic.
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.building-", dir=output_dir.parent))
    try:
        model_dir = staging / "model"
        _write_tokenizer_files(model_dir / "tokenizer")
        tokenizer = CLIPTokenizer.from_pretrained(model_dir / "tokenizer")

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            unet = UNet2DConditionModel(
                sample_size=16,  # latents; × vae_scale_factor 4 = 64 px images
                in_channels=4,
                out_channels=4,
                block_out_channels=(32, 64),
                layers_per_block=1,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                mid_block_type="UNetMidBlock2DCrossAttn",
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=32,
                # diffusers reads this as the number of heads (SD 1.x's historical naming): 8 heads of 4 and 8 dims.
                attention_head_dim=8,
                norm_num_groups=32,
            )
            torch.manual_seed(seed)
            vae = AutoencoderKL(
                in_channels=3,
                out_channels=3,
                block_out_channels=(32, 64, 64),  # three blocks: two downsamplings, vae_scale_factor 4
                down_block_types=("DownEncoderBlock2D",) * 3,
                up_block_types=("UpDecoderBlock2D",) * 3,
                layers_per_block=1,
                latent_channels=4,
                norm_num_groups=32,
                sample_size=64,
            )
            torch.manual_seed(seed)
            text_encoder = CLIPTextModel(
                CLIPTextConfig(
                    vocab_size=len(tokenizer),
                    hidden_size=32,
                    intermediate_size=64,
                    num_hidden_layers=2,
                    num_attention_heads=4,
                    max_position_embeddings=_MAX_TOKENS,
                    projection_dim=32,
                    # The pooled output is read at the first end token, found by this id.
                    bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id,
                )
            )
        # Stable Diffusion 1.5's scheduler settings.
        scheduler = PNDMScheduler(
            num_train_timesteps=1000,
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            prediction_type="epsilon",
            skip_prk_steps=True,
            set_alpha_to_one=False,
            steps_offset=1,
        )
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        with _library_progress_bars_disabled():
            pipe.save_pretrained(model_dir, safe_serialization=True)
        # save_pretrained rewrites the tokenizer in the installed transformers' layout; keep our files as the source.
        _write_tokenizer_files(model_dir / "tokenizer")
        marker = {"tiny_model_version": TINY_MODEL_VERSION, "seed": seed}
        (model_dir / _MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")

        if output_dir.exists():
            output_dir.rmdir()  # checked empty above; os.replace cannot replace a folder on every OS
        os.replace(model_dir, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output_dir


def default_model_dir() -> Path:
    """The embedded model's cache folder, ``tiny-sd-v{TINY_MODEL_VERSION}`` under difflora's cache root.

    The root is ``$DIFFLORA_CACHE`` if set, else ``$XDG_CACHE_HOME/difflora``, else ``~/.cache/difflora``. The
    version is in the name so that difflora releases with different tiny models never fight over one folder.
    """
    if os.environ.get("DIFFLORA_CACHE"):
        root = Path(os.environ["DIFFLORA_CACHE"]).expanduser()
    elif os.environ.get("XDG_CACHE_HOME"):
        root = Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "difflora"
    else:
        root = Path.home() / ".cache" / "difflora"
    return root / f"tiny-sd-v{TINY_MODEL_VERSION}"


def _is_current_tiny_model(model_dir: Path) -> bool:
    """Whether ``model_dir`` holds a complete embedded model of this difflora's ``TINY_MODEL_VERSION``."""
    try:
        marker = json.loads((model_dir / _MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        isinstance(marker, dict)
        and marker.get("tiny_model_version") == TINY_MODEL_VERSION
        and (model_dir / "model_index.json").is_file()
    )


def _discard_folder(folder: Path) -> None:
    """Remove ``folder``: first renamed aside (atomic), so no process ever sees it half deleted."""
    doomed = folder.with_name(f".{folder.name}.stale-{uuid.uuid4().hex[:8]}")
    try:
        os.replace(folder, doomed)
    except FileNotFoundError:
        return  # another process discarded it already
    shutil.rmtree(doomed, ignore_errors=True)


def ensure_default_model() -> Path:
    """The embedded model's folder (``default_model_dir()``), built there first if missing or from another version.

    Safe when several processes call it at once: each builds in its own temporary folder and renames it into
    place; a process that loses the race uses the winner's copy.
    """
    model_dir = default_model_dir()
    if _is_current_tiny_model(model_dir):
        return model_dir
    if model_dir.exists():
        _discard_folder(model_dir)  # an old version's model, or a folder someone tampered with
    try:
        build_tiny_model(model_dir)
    except (OSError, InvalidArgumentError):
        # The rename (or the emptiness check) failed because another process put its copy in place first.
        if not _is_current_tiny_model(model_dir):
            raise
    return model_dir


def is_embedded(model: str | os.PathLike | None) -> bool:
    """Whether ``model`` names the embedded tiny model: ``None``, ``""`` or ``DEFAULT_MODEL``."""
    return model is None or (isinstance(model, str) and model.strip() in ("", DEFAULT_MODEL))


# ----- devices and dtypes -------------------------------------------------------------------------------------------


def _mps_available() -> bool:
    """Whether Apple's MPS backend is usable (torch builds without it lack ``torch.backends.mps`` entirely)."""
    mps = getattr(torch.backends, "mps", None)
    return mps is not None and mps.is_available()


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """The torch device ``name`` stands for: ``auto`` → CUDA if available, else MPS if available, else CPU.

    Other names are read by torch (``cpu``, ``cuda``, ``cuda:1``, ``mps``); CUDA and MPS are checked here so that a
    machine without them fails now with one line, not later inside diffusers.

    Raises:
        InvalidArgumentError: the name is not a device, or names a backend this machine does not have.
    """
    if isinstance(name, torch.device):
        return name
    text = name.strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise InvalidArgumentError(f"--device {name!r} is not a device (auto, cpu, cuda, cuda:N, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError(f"--device {name!r}: CUDA is not available on this machine (try auto or cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise InvalidArgumentError(f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not _mps_available():
        raise InvalidArgumentError(f"--device {name!r}: MPS is not available on this machine (try auto or cpu)")
    return device


_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


def resolve_dtype(name: str | torch.dtype, device: torch.device | str = "cpu") -> torch.dtype:
    """The torch dtype ``name`` stands for: ``auto`` → float16 on CUDA, float32 elsewhere.

    Also ``fp32``/``float32``, ``fp16``/``float16``, ``bf16``/``bfloat16``. ``auto`` keeps float32 off CUDA because
    half precision is slow or unsupported for these models on CPU.

    Raises:
        InvalidArgumentError: any other name; the message lists the choices.
    """
    if isinstance(name, torch.dtype):
        return name
    text = name.strip().lower()
    if text == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    if text not in _DTYPES:
        raise InvalidArgumentError(f"--dtype {name!r} is not one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[text]


# ----- loading ------------------------------------------------------------------------------------------------------


def _one_line_reason(error: BaseException) -> str:
    """The first non-empty line of ``error``'s message, at most ~200 characters: what the user needs to see."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reason = lines[0] if lines else type(error).__name__
    return reason if len(reason) <= _MAX_REASON_CHARS else reason[: _MAX_REASON_CHARS - 3] + "..."


def _dtype_keyword(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``from_pretrained``'s dtype argument under the name the installed diffusers wants.

    diffusers 0.42 renamed ``torch_dtype`` to ``dtype`` and warns (FutureWarning) on the old name; the older
    releases difflora supports know only ``torch_dtype``.
    """
    import diffusers
    from packaging.version import Version

    name = "dtype" if Version(diffusers.__version__).release >= (0, 42) else "torch_dtype"
    return {name: dtype}


# Hub ids are "owner/name" (or a bare legacy "name"): letters, digits and - _ . only.
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")
_MODEL_FILE_SUFFIXES = (".safetensors", ".json", ".yaml", ".yml", ".onnx", ".gguf", *_PICKLE_SUFFIXES)


def _looks_like_path(model: str) -> bool:
    """Whether a name that exists nowhere on disk was meant as a path (so it is a typo, not a hub id)."""
    return (
        model.startswith((".", "~", "/"))
        or "\\" in model
        or os.path.isabs(model)
        or model.lower().endswith(_MODEL_FILE_SUFFIXES)
        or not _HUB_ID.fullmatch(model)
    )


def _load(
    label: str, load: Callable[..., StableDiffusionPipeline], *args: Any, hint: str = "", **kwargs: Any
) -> StableDiffusionPipeline:
    """Call a diffusers loader; any failure becomes one ``ModelLoadError`` line naming the model (plus ``hint``)."""
    try:
        return load(*args, **kwargs)
    except Exception as error:  # diffusers, transformers, the hub and safetensors raise many kinds
        reason = _one_line_reason(error)
        if "meta tensor" in reason:
            # diffusers leaves weights a checkpoint lacks as empty placeholders and then fails on them.
            reason = "the checkpoint lacks weights this architecture needs: a wrong --model-config or a damaged file"
        raise ModelLoadError(f"--model {label}: could not load ({reason}){hint}") from error


def load_pipeline(
    model: str | os.PathLike | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    model_config: str | os.PathLike | None = None,
    quiet: bool = False,
) -> StableDiffusionPipeline:
    """A ``StableDiffusionPipeline`` for ``model``, on ``device``, in ``dtype``, without a safety checker.

    ``model`` is one of:

    - ``None``, ``""`` or ``"embedded"``: the embedded tiny model, built into the cache on first use;
    - a diffusers folder (it must hold ``model_index.json``);
    - a single-file ``.safetensors`` checkpoint; ``model_config`` (a diffusers folder or hub id) gives its
      architecture, without which diffusers may need the hub to guess it;
    - a hub id such as ``owner/name``: the only case that may download.

    Pickle checkpoints (``.ckpt``, ``.bin``, ``.pt``, ``.pth``) are refused, since loading one runs arbitrary code.
    ``quiet`` turns off the loading and denoising progress bars (they are on by default, as in diffusers).

    Raises:
        ModelLoadError: one line naming the model and what went wrong; the library's exception is chained.
    """
    from diffusers import StableDiffusionPipeline

    device = resolve_device(device)
    progress_bars_off = _library_progress_bars_disabled() if quiet else contextlib.nullcontext()
    pipeline_options = {**_dtype_keyword(dtype), "safety_checker": None, "requires_safety_checker": False}

    with progress_bars_off:
        if is_embedded(model):
            label = DEFAULT_MODEL
            try:
                model_dir = ensure_default_model()
            except (OSError, InvalidArgumentError) as error:
                where = default_model_dir()
                raise ModelLoadError(
                    f"--model {label}: could not build the embedded model in {where} ({_one_line_reason(error)})"
                ) from error
            pipe = _load(label, StableDiffusionPipeline.from_pretrained, model_dir, **pipeline_options)
        else:
            label = os.fspath(model)
            path = Path(label).expanduser()
            if path.is_dir():
                if not (path / "model_index.json").is_file():
                    raise ModelLoadError(
                        f"--model {label}: folder has no model_index.json, so it is not a diffusers pipeline folder"
                    )
                pipe = _load(label, StableDiffusionPipeline.from_pretrained, path, **pipeline_options)
            elif path.is_file():
                suffix = path.suffix.lower()
                if suffix in _PICKLE_SUFFIXES:
                    raise ModelLoadError(
                        f"--model {label}: pickle checkpoints are refused (loading one can run code); "
                        "convert it to .safetensors"
                    )
                if suffix != ".safetensors":
                    raise ModelLoadError(f"--model {label}: not a diffusers folder or a .safetensors checkpoint")
                single_file_options = dict(pipeline_options)
                hint = "; --model-config naming a diffusers folder of its architecture avoids the hub"
                if model_config is not None:
                    single_file_options["config"] = os.fspath(model_config)
                    hint = ""
                pipe = _load(
                    label, StableDiffusionPipeline.from_single_file, str(path), hint=hint, **single_file_options
                )
            elif _looks_like_path(label):
                raise ModelLoadError(f"--model {label}: no such file or folder")
            else:
                pipe = _load(label, StableDiffusionPipeline.from_pretrained, label, **pipeline_options)

    try:
        pipe = pipe.to(device)
    except Exception as error:  # out of memory, a dtype the device lacks, ...
        raise ModelLoadError(f"--model {label}: could not move it to {device} ({_one_line_reason(error)})") from error
    if quiet:
        pipe.set_progress_bar_config(disable=True)
    return pipe
