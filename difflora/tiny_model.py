"""The embedded tiny Stable Diffusion: built locally, once, into difflora's cache; nothing is downloaded.

It is a real Stable Diffusion 1.x architecture (a UNet with cross-attention down, mid and up blocks, an AutoencoderKL,
a CLIP text encoder and tokenizer, an SD 1.5 scheduler) at toy sizes with seeded random weights, so every machine gets
the same weights. It draws noise, not pictures, but every code path (processors, adapter files, training, UI) runs on
it in seconds on a CPU, and diffusers loads it as it loads any model.
"""

from __future__ import annotations

import collections
import functools
import json
import os
import shutil
import uuid
from pathlib import Path

import torch

from ._files import atomic_directory
from ._libraries import progress_bars_disabled
from .errors import InvalidArgumentError

__all__ = [
    "DEFAULT_MODEL",
    "TINY_MODEL_VERSION",
    "build_tiny_model",
    "default_model_dir",
    "ensure_default_model",
    "is_embedded",
]

DEFAULT_MODEL = "embedded"
"""The name users give for the embedded tiny model (``None`` and ``""`` mean it too)."""

TINY_MODEL_VERSION = 2
"""Bumped whenever the embedded model's architecture, tokenizer or weights change, so old caches are rebuilt."""

_MARKER_NAME = "difflora_tiny.json"

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
    """Byte-pair merges learned from ``words``: the most frequent adjacent pair first, a tie going to the pair that
    sorts first, until every word is one symbol.

    Words are spelled in byte symbols with ``</w>`` on the last, as CLIP's tokenizer spells them, so the merges apply
    unchanged at tokenization time. Written out rather than taken from the ``tokenizers`` BPE trainer, which breaks
    ties between equally frequent pairs in hash order: its merges, and with them the embedded model's token ids,
    changed from one process to the next.
    """
    from tokenizers import pre_tokenizers

    spell = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    spellings: collections.Counter[tuple[str, ...]] = collections.Counter()
    for word in words:
        symbols = list(spell.pre_tokenize_str(word)[0][0])
        symbols[-1] += _END_OF_WORD
        spellings[tuple(symbols)] += 1
    merges: list[tuple[str, str]] = []
    while True:
        pairs: collections.Counter[tuple[str, str]] = collections.Counter()
        for symbols, count in spellings.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += count
        if not pairs:
            return merges
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        spellings = collections.Counter({_merged(symbols, best): count for symbols, count in spellings.items()})


def _merged(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    """``symbols`` with every occurrence of ``pair``, left to right, joined into one symbol."""
    joined, index = [], 0
    while index < len(symbols):
        if symbols[index:index + 2] == pair:
            joined.append(pair[0] + pair[1])
            index += 2
        else:
            joined.append(symbols[index])
            index += 1
    return tuple(joined)


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


def _tiny_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
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


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
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


def _tiny_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
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


def _sd15_scheduler():
    """Stable Diffusion 1.5's scheduler settings."""
    from diffusers import PNDMScheduler

    return PNDMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def build_tiny_model(output_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write the embedded tiny Stable Diffusion 1.x to ``output_dir`` (which must be new or empty); returns it.

    What is written is a plain diffusers folder (``StableDiffusionPipeline.from_pretrained`` loads it offline):
    safetensors weights, configs, a CLIP tokenizer learned here, and ``difflora_tiny.json`` recording
    ``TINY_MODEL_VERSION``. Each component is initialised right after ``torch.manual_seed(seed)``, so a given
    ``seed`` writes byte-identical weights on every machine (the caller's global RNG state is left as it was).
    The folder is built beside ``output_dir`` and renamed into place at the end, so a crash never leaves a half
    model where a model is expected.

    Raises:
        InvalidArgumentError: ``output_dir`` exists and is not an empty folder.
    """
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    output_dir = Path(output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise InvalidArgumentError(f"{output_dir}: exists and is not an empty folder; give a new folder", "output_dir")
    with atomic_directory(output_dir) as staging:
        _write_tokenizer_files(staging / "tokenizer")
        tokenizer = CLIPTokenizer.from_pretrained(staging / "tokenizer")
        with torch.random.fork_rng(devices=[]):
            components = {}
            for name, build in (("unet", _tiny_unet), ("vae", _tiny_vae),
                                ("text_encoder", functools.partial(_tiny_text_encoder, tokenizer))):
                torch.manual_seed(seed)
                components[name] = build()
        pipe = StableDiffusionPipeline(
            **components, tokenizer=tokenizer, scheduler=_sd15_scheduler(),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        with progress_bars_disabled():
            pipe.save_pretrained(staging, safe_serialization=True)
        # save_pretrained rewrites the tokenizer in the installed transformers' layout; keep our files as the source.
        _write_tokenizer_files(staging / "tokenizer")
        marker = {"tiny_model_version": TINY_MODEL_VERSION, "seed": seed}
        (staging / _MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
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
    _discard_older_versions(model_dir)
    return model_dir


def _discard_older_versions(model_dir: Path) -> None:
    """Remove the embedded models other difflora versions built beside ``model_dir`` (``tiny-sd-v1`` once v2 is in
    place): each is a few MB nobody will load again. Only folders holding difflora's marker are touched."""
    for folder in model_dir.parent.glob("tiny-sd-v*"):
        if folder != model_dir and (folder / _MARKER_NAME).is_file():
            _discard_folder(folder)


def is_embedded(model: str | os.PathLike | None) -> bool:
    """Whether ``model`` names the embedded tiny model: ``None``, ``""`` or ``DEFAULT_MODEL``."""
    return model is None or (isinstance(model, str) and model.strip() in ("", DEFAULT_MODEL))
