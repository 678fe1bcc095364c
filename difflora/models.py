"""Models: the embedded tiny Stable Diffusion, and loading any model a user names.

The embedded model is a real Stable Diffusion 1.x architecture (UNet with cross-attention down, mid and up blocks,
an AutoencoderKL, a CLIP text encoder and tokenizer, an SD 1.5 scheduler) at toy sizes with seeded random weights.
difflora builds it locally, once, into its cache folder: nothing is downloaded, and every machine gets the same
weights. It produces noise, not pictures, but every code path (processors, files, training, UI) runs on it in
seconds, and diffusers loads it as it loads any model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .errors import InvalidArgumentError, ModelLoadError

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
TINY_MODEL_VERSION = 1
_MARKER = "difflora_tiny.json"
_PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")

# Words the tiny tokenizer learns its merges from: the vocabulary of image prompts, so that common prompt words
# become one or two tokens as they do with CLIP's real tokenizer.
_TOKENIZER_CORPUS = """
a an the of in on at with and or by from to for under over near photo photograph picture painting drawing
sketch illustration render portrait landscape still life style art artwork detailed highly high quality best
masterpiece beautiful cinematic lighting light dark night day morning evening sunset sunrise dusk dawn sky cloud
clouds sun moon star stars rain snow fog mist storm sea ocean lake river water wave waves beach sand desert forest
tree trees flower flowers garden field grass mountain mountains hill valley city street road house castle tower
lighthouse bridge village town building window door room interior cat dog fox bird horse wolf bear fish dragon
person man woman girl boy child face eyes hair smile hands red orange yellow green blue purple pink brown black
white gray grey gold silver color colors colorful vivid pastel watercolor oil ink pencil charcoal pixel anime
cartoon comic digital concept fantasy science fiction futuristic vintage retro old new small large big tiny huge
soft sharp blurry blur noise grain texture pattern geometric abstract minimal simple bright warm cold glowing
neon shadow shadows reflection wide angle close up view scene background foreground trending sks ohwx token
""".split()


# ----- the embedded model -------------------------------------------------------------------------------------------


def _build_tokenizer(output_dir: Path):
    """A CLIP tokenizer with a byte-level BPE vocabulary learned here from ``_TOKENIZER_CORPUS``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    byte_symbols = pre_tokenizers.ByteLevel.alphabet()
    byte_symbols.sort()
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Lowercase()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=2048, min_frequency=1, end_of_word_suffix="</w>", initial_alphabet=byte_symbols, show_progress=False
    )
    bpe.train_from_iterator([" ".join(_TOKENIZER_CORPUS)] * 2, trainer=trainer)
    merges = [" ".join(pair) if isinstance(pair, (tuple, list)) else pair for pair in json.loads(bpe.to_str())["model"]["merges"]]

    # CLIP's layout: every byte symbol, every byte symbol ending a word, the merge results in merge order, specials.
    vocab: dict[str, int] = {}
    for symbol in byte_symbols + [s + "</w>" for s in byte_symbols]:
        vocab.setdefault(symbol, len(vocab))
    for merge in merges:
        vocab.setdefault(merge.replace(" ", ""), len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))

    tokenizer_dir = output_dir / "tokenizer"
    tokenizer_dir.mkdir(parents=True)
    (tokenizer_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (tokenizer_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(
        vocab=str(tokenizer_dir / "vocab.json"), merges=str(tokenizer_dir / "merges.txt"), model_max_length=77
    )
    return tokenizer, tokenizer_dir


def build_tiny_model(output_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write the tiny Stable Diffusion 1.x folder to ``output_dir`` (which must not exist or be empty).

    The folder is built beside ``output_dir`` and renamed into place at the end, so a crash leaves no half model.
    Weights are seeded (``seed``), so the same call writes byte-identical weights on every machine.
    """
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise InvalidArgumentError(f"{output_dir}: folder exists and is not empty")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        tokenizer, tokenizer_dir = _build_tokenizer(staging / "scratch")
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=32,
        )
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=(32, 64, 64),
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=32,
            sample_size=64,
        )
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
                projection_dim=32,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        scheduler = PNDMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            num_train_timesteps=1000,
            prediction_type="epsilon",
            skip_prk_steps=True,
            steps_offset=1,
            set_alpha_to_one=False,
        )
        pipe = StableDiffusionPipeline(
            unet=unet,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        model_dir = staging / "model"
        pipe.save_pretrained(model_dir, safe_serialization=True)
        # Keep the tokenizer exactly as built (vocab.json + merges.txt), whatever save_pretrained adds beside it.
        for name in ("vocab.json", "merges.txt"):
            shutil.copyfile(tokenizer_dir / name, model_dir / "tokenizer" / name)
        (model_dir / _MARKER).write_text(json.dumps({"tiny_model_version": TINY_MODEL_VERSION, "seed": seed}))
        if output_dir.exists():
            output_dir.rmdir()  # empty, checked above
        os.replace(model_dir, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output_dir


def default_model_dir() -> Path:
    """Where the embedded model is cached: ``$DIFFLORA_CACHE``, else ``$XDG_CACHE_HOME/difflora``, else ``~/.cache``."""
    if os.environ.get("DIFFLORA_CACHE"):
        root = Path(os.environ["DIFFLORA_CACHE"])
    elif os.environ.get("XDG_CACHE_HOME"):
        root = Path(os.environ["XDG_CACHE_HOME"]) / "difflora"
    else:
        root = Path.home() / ".cache" / "difflora"
    return root / f"tiny-sd-v{TINY_MODEL_VERSION}"


def _is_current(model_dir: Path) -> bool:
    try:
        return json.loads((model_dir / _MARKER).read_text())["tiny_model_version"] == TINY_MODEL_VERSION
    except (OSError, ValueError, KeyError):
        return False


def ensure_default_model() -> Path:
    """The embedded model's folder, built on first use. Safe when two processes build it at once."""
    model_dir = default_model_dir()
    if _is_current(model_dir):
        return model_dir
    if model_dir.exists():
        shutil.rmtree(model_dir, ignore_errors=True)  # an old or broken cache
    try:
        build_tiny_model(model_dir)
    except (OSError, InvalidArgumentError):
        # Another process renamed its copy into place first: use that one.
        if not _is_current(model_dir):
            raise
    return model_dir


def is_embedded(model: str | os.PathLike | None) -> bool:
    return model is None or str(model) in ("", DEFAULT_MODEL)


# ----- loading ------------------------------------------------------------------------------------------------------


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto`` → CUDA if available, else MPS if available, else CPU; anything else as torch reads it."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise InvalidArgumentError(f"--device {name!r} is not a device (auto, cpu, cuda, cuda:N, mps)") from None


_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


def resolve_dtype(name: str | torch.dtype, device: torch.device | str = "cpu") -> torch.dtype:
    """``auto`` → float16 on CUDA, float32 elsewhere; also fp32/float32, fp16/float16, bf16/bfloat16."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise InvalidArgumentError(f"--dtype {name!r} is not one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _dtype_option(dtype: torch.dtype) -> dict:
    # diffusers 0.42 renamed `torch_dtype` to `dtype` (the old name warns); older releases know only `torch_dtype`.
    import diffusers
    from packaging.version import Version

    return {"dtype" if Version(diffusers.__version__) >= Version("0.42") else "torch_dtype": dtype}


def _looks_like_path(model: str) -> bool:
    # Hub ids are "owner/name"; anything else that does not exist is a mistyped path.
    return (
        model.startswith(("/", ".", "~"))
        or "\\" in model
        or model.count("/") != 1
        or Path(model).suffix.lower() in (".safetensors",) + _PICKLE_SUFFIXES
    )


def load_pipeline(
    model: str | os.PathLike | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    model_config: str | os.PathLike | None = None,
    quiet: bool = False,
):
    """A ``StableDiffusionPipeline`` for ``model`` on ``device`` in ``dtype``.

    ``model`` is ``None``/``"embedded"`` (the embedded tiny model), a diffusers folder (with ``model_index.json``), a
    single-file ``.safetensors`` checkpoint (``model_config``: a diffusers folder or hub id giving its architecture;
    without it diffusers may need the hub), or a hub id, which downloads only then.

    Raises:
        ModelLoadError: one line naming the model and what went wrong; pickle checkpoints are refused.
    """
    from diffusers import StableDiffusionPipeline

    device = resolve_device(device)
    if is_embedded(model):
        source: str | Path = ensure_default_model()
        label = DEFAULT_MODEL
    else:
        label = str(model)
        source = Path(model).expanduser()
        if not source.exists():
            if _looks_like_path(label):
                raise ModelLoadError(f"--model {label}: no such file or folder")
            source = label  # a hub id
    options = dict(_dtype_option(dtype), safety_checker=None, requires_safety_checker=False)
    try:
        if isinstance(source, Path) and source.is_dir():
            if not (source / "model_index.json").is_file():
                raise ModelLoadError(f"--model {label}: folder has no model_index.json (not a diffusers pipeline folder)")
            pipe = StableDiffusionPipeline.from_pretrained(source, **options)
        elif isinstance(source, Path):
            if source.suffix.lower() in _PICKLE_SUFFIXES:
                raise ModelLoadError(f"--model {label}: pickle checkpoints are refused; convert it to .safetensors")
            if source.suffix.lower() != ".safetensors":
                raise ModelLoadError(f"--model {label}: not a diffusers folder or a .safetensors checkpoint")
            single_file_options = _dtype_option(dtype)
            if model_config is not None:
                single_file_options["config"] = str(model_config)
            pipe = StableDiffusionPipeline.from_single_file(str(source), **single_file_options)
        else:
            pipe = StableDiffusionPipeline.from_pretrained(source, **options)
    except ModelLoadError:
        raise
    except Exception as error:  # diffusers/transformers/hub raise many kinds; the user needs one line
        raise ModelLoadError(f"--model {label}: could not load ({_one_line(error)})") from error
    pipe = pipe.to(device)
    if quiet:
        pipe.set_progress_bar_config(disable=True)
    return pipe
