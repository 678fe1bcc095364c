"""The ``difflora`` command line. Each sub-command opens its files here and calls the library.

Bad input ends in one line ``difflora: error: <what and where>`` and exit code 2. Every command that writes checks
its output path first (:func:`~difflora._files.check_output`), before it reads an input or loads a model.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from ._entry import OneLineErrorParser, add_model_options, quiet_libraries, run_main
from ._files import check_output
from .errors import InvalidArgumentError, seed_number
from .keys import PICKLE_SUFFIXES, adapter_name_from_path

__all__ = ["main", "parse_lora_spec", "LoRASpec"]


@dataclass(frozen=True)
class LoRASpec:
    path: Path
    weight: float = 1.0


def _exists(path: Path) -> bool:
    """Whether ``path`` exists; a name the OS refuses (over 255 bytes) does not, and reading it says why."""
    try:
        return path.exists()
    except OSError:
        return False


def parse_lora_spec(text: str, option: str = "--lora") -> LoRASpec:
    """``FILE`` or ``FILE:WEIGHT`` (weight in [-100, 100], negative included). A path that exists as given wins."""
    from .lora import adapter_weight

    if _exists(Path(text)) or ":" not in text:
        return LoRASpec(Path(text))
    path_text, _, weight_text = text.rpartition(":")
    return LoRASpec(Path(path_text), adapter_weight(weight_text, f"{option} {text}: weight", parameter=None))


def _output(path: str, kind: str = "file", *, suffixes: tuple[str, ...] = (".safetensors",), new: bool = False,
            parameter: str = "out") -> Path:
    """The command's output path, checked before any work (pickle suffixes refused everywhere)."""
    return check_output(path, kind, suffixes=suffixes if kind == "file" else (), pickle_suffixes=PICKLE_SUFFIXES,
                        new=new, parameter=parameter)


def _adapter_names(specs: list[LoRASpec]) -> list[str]:
    """The name each adapter gets in the runtime: its file's stem (as messages about it and the PNG's
    ``<lora:name:weight>`` show it), with ``_N`` added where two files share a stem."""
    names: list[str] = []
    for index, spec in enumerate(specs):
        stem = name = adapter_name_from_path(spec.path)
        number = index
        while name in names:
            name, number = f"{stem}_{number}", number + 1
        names.append(name)
    return names


def _cmd_init_model(args: argparse.Namespace) -> int:
    from .tiny_model import build_tiny_model

    output = _output(args.dir, "folder", new=True, parameter="dir")
    seed_number(args.seed)
    build_tiny_model(output, seed=args.seed)
    print(f"wrote the embedded tiny Stable Diffusion to {output}")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from .generate import AdapterUse, GenerationSettings, generate, save_pngs
    from .pipelines import load_pipeline, resolve_device, resolve_dtype
    from .runtime import LoRARuntime
    from .blocks import BlockWeights

    # One image goes to --out; several to stem-0.png, stem-1.png, … (checked once their number is known to be sound).
    output = _output(args.out, suffixes=(".png",)) if args.num_images == 1 else None
    specs = [parse_lora_spec(text) for text in args.lora]
    block_weights = BlockWeights.parse(args.block_weights, "block_weights") if args.block_weights else None
    settings = GenerationSettings(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        # Unset: the model's native size once it is loaded; 8 only to validate the rest first. A given 0 is checked.
        width=8 if args.width is None else args.width,
        height=8 if args.height is None else args.height,
        num_images=args.num_images,
    )
    settings.validate()
    image_paths = [output] if output else [
        _output(str(Path(args.out).with_name(f"{Path(args.out).stem}-{index}{Path(args.out).suffix}")),
                suffixes=(".png",))
        for index in range(settings.num_images)
    ]
    # Read every adapter before the model loads, so a bad file fails fast.
    from .formats import read_adapter

    states = [(spec, read_adapter(spec.path)) for spec in specs]
    device = resolve_device(args.device)
    pipe = load_pipeline(
        args.model, device=device, dtype=resolve_dtype(args.dtype, device), model_config=args.model_config
    )
    native_size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    settings.width = native_size if args.width is None else args.width
    settings.height = native_size if args.height is None else args.height
    runtime = LoRARuntime.attach(pipe)
    uses = []
    for name, (spec, state) in zip(_adapter_names(specs), states):
        runtime.add_adapter(name, state, spec.weight, block_weights, source=str(spec.path), strict=args.strict)
        uses.append(AdapterUse(name, spec.weight, str(spec.path), str(block_weights) if block_weights else None))
    if args.fuse and uses:
        runtime.fuse()
    images = generate(pipe, settings)  # refuses a mix the model's dtype cannot hold before the first step
    written = save_pngs(images, image_paths, settings, model=str(args.model),
                        scheduler=type(pipe.scheduler).__name__, adapters=uses)
    print("\n".join(str(path) for path in written))
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .formats import read_adapter
    from .reports import compat_lines, describe_adapter, summary_rows

    state = read_adapter(args.file)
    summary = {"file": str(args.file), **describe_adapter(state)}
    if args.compat:
        summary["compat"] = _compat(Path(args.file), state)
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True))
        return 0
    for label, value in [("file", summary["file"]), *summary_rows(summary)]:
        print(f"{(label + ':').ljust(11)} {value}")
    if summary["metadata"]:
        print("metadata:")
        for key, value in sorted(summary["metadata"].items()):
            value = value if len(value) <= 200 else value[:197] + "..."
            print(f"  {key}: {value}")
    if args.compat:
        print("\n".join(["", "what other tools apply (by their code; see difflora.compat):", *compat_lines(
            summary["compat"])]))
    return 0


def _compat(path: Path, state) -> list[dict]:
    """``inspect --compat``: what diffusers, ComfyUI, A1111 and Forge apply of the file at ``path``."""
    from .compat import compat_report
    from .formats import DIFFUSERS_WEIGHTS_FILE
    from .formats._common import read_safetensors

    if path.is_dir() and (path / DIFFUSERS_WEIGHTS_FILE).is_file():  # what load_lora_weights reads of a folder
        path = path / DIFFUSERS_WEIGHTS_FILE
    elif path.is_dir():
        raise InvalidArgumentError(f"compat reads one .safetensors file; {path} is a PEFT folder", "compat")
    tensors, header = read_safetensors(path)
    return [report.as_dict() for report in compat_report(tensors, header, state)]


def _cmd_convert(args: argparse.Namespace) -> int:
    from .formats import read_adapter, write_adapter

    output = _output(args.out, "folder", new=True) if args.to == "peft" else _output(args.out)
    if args.rank is not None and (args.to == "kohya" or args.rank <= 0):
        raise InvalidArgumentError(f"rank must be a positive integer, for --to diffusers, peft or difflora (kohya "
                                   f"files keep every kind as it is), got {args.rank} with --to {args.to}", "rank")
    state = read_adapter(args.input)
    if state.skipped and args.strict:
        raise InvalidArgumentError(f"strict: {args.input} holds {state.skipped_summary()}", "strict")
    errors: dict[str, float] = {}
    if args.to != "kohya":  # what the target holds as it is; the rest as LoRA by SVD at --rank
        state, errors = _held_by(args.input, state, args.rank,
                                 "a PEFT folder" if args.to == "peft" else f"a {args.to} file")
    if args.to == "peft":
        from .formats import write_peft_folder

        write_peft_folder(state, output)
    else:
        write_adapter(state, output, layout=args.to)
    if state.skipped:
        print(f"not carried over: {state.skipped_summary(limit=10)}", file=sys.stderr)
    if errors:
        from .reports import error_summary

        print(f"turned into LoRA by SVD at rank {args.rank}: {error_summary(errors)}", file=sys.stderr)
    print(args.out)
    return 0


def _held_by(path: str, state, rank: int | None, target: str):
    """``(state, errors)``: ``state`` as ``target`` holds it (:func:`~difflora.blend.as_lora`; what ``target``
    holds is what its writer accepts, :meth:`~difflora.adapter.AdapterState.lora_only_problem`)."""
    from .adapter import AdapterState
    from .blend import as_lora

    def holds(module_key: str, module) -> bool:
        return AdapterState(modules={module_key: module}).lora_only_problem(target) is None

    result = _of_input(path, as_lora, state, rank, holds, target)
    return result.state, result.relative_errors


def _layout(state, given: str | None) -> str:
    """``--format``, or when not given ``difflora``, and ``kohya`` for a result holding other kinds than plain LoRA
    (only kohya files keep LoHa, LoKr, full diffs and DoRA)."""
    return given or ("difflora" if state.lora_only_problem("a difflora file") is None else "kohya")


def _report_errors(errors: dict[str, float]) -> None:
    from .reports import error_summary

    if errors:
        print(error_summary(errors), file=sys.stderr)


def _cmd_blend(args: argparse.Namespace) -> int:
    from .blend import blend
    from .formats import read_adapter, write_adapter

    output = _output(args.out)
    specs = [parse_lora_spec(text, option="blend") for text in args.adapters]
    adapters = [(read_adapter(spec.path), spec.weight) for spec in specs]
    dora = {key: (spec.path, module) for spec, (state, _) in zip(specs, adapters)
            for key, module in state.modules.items() if module.dora_scale is not None}
    base_weights = None
    if dora and args.model is None:
        key, (path, module) = next(iter(dora.items()))
        raise InvalidArgumentError(f"{path}: module {key!r} is {module.kind} with DoRA, whose change depends on the "
                                   "base model's weights: give that model with --model (or use the file as it is: "
                                   "generate, merge)")
    if dora:
        from .extract import layer_weights
        from .pipelines import load_pipeline

        pipe = load_pipeline(args.model, model_config=args.model_config, quiet=True)
        base_weights = layer_weights(_components(pipe), dora)
    result = blend(adapters, method=args.method, rank=args.rank, density=args.density, base_weights=base_weights)
    sources = ", ".join(f"{spec.path.name}:{spec.weight:g}" for spec in specs)
    write_adapter(result.state, output, {"difflora.blend_sources": sources}, layout=_layout(result.state, args.format))
    _report_errors(result.relative_errors)
    print(args.out)
    return 0


def _of_input(path: str, call, *args, **kwargs):
    """``call(*args, **kwargs)``, with a refusal of its ``state`` argument (a module it cannot take) told as one of
    the file ``path``: the command line has no ``state``, it has the file."""
    try:
        return call(*args, **kwargs)
    except InvalidArgumentError as error:
        if error.parameter != "state":
            raise
        raise InvalidArgumentError(f"{path}: {str(error).removeprefix('state: ')}") from None


def _cmd_scale(args: argparse.Namespace) -> int:
    from .blend import scale_adapter
    from .blocks import SD_UNET_BLOCKS, BlockWeights, unet_blocks
    from .formats import read_adapter, write_adapter
    from .lora import adapter_weight

    output = _output(args.out)
    weight = adapter_weight(args.weight)
    block_weights = BlockWeights.parse(args.block_weights, "block_weights") if args.block_weights else None
    if block_weights is not None:  # no model here: any block an SD or SDXL UNet has is a block name
        block_weights.check_blocks(SD_UNET_BLOCKS, "an SD or SDXL UNet")
    adapter = read_adapter(args.input)
    state = _of_input(args.input, scale_adapter, adapter, weight, block_weights)
    write_adapter(state, output, layout=_layout(state, args.format))
    # A1111 presets name every block, those with no attention in SD 1.5 included: worth a word, not an error.
    idle = block_weights.blocks_outside(unet_blocks(key.split(".", 1) for key in adapter.modules)) \
        if block_weights is not None else []
    if idle:
        print(f"difflora: warning: --block-weights: no module of {args.input} is in {', '.join(idle)}, so their "
              "weights change nothing", file=sys.stderr)
    print(args.out)
    return 0


def _cmd_resize(args: argparse.Namespace) -> int:
    from .blend import resize_adapter
    from .formats import read_adapter, write_adapter

    output = _output(args.out)
    result = _of_input(args.input, resize_adapter, read_adapter(args.input), rank=args.rank, energy=args.energy)
    write_adapter(result.state, output, layout=_layout(result.state, args.format))
    _report_errors(result.relative_errors)
    print(args.out)
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from ._files import atomic_directory
    from .formats import read_adapter
    from .pipelines import load_pipeline, resolve_device, resolve_dtype
    from .runtime import LoRARuntime

    single_file = Path(args.out).suffix.lower() == ".safetensors"
    output = _output(args.out, "file" if single_file else "folder", new=True)
    specs = [parse_lora_spec(text) for text in args.lora]
    if not specs:
        raise InvalidArgumentError("merge needs at least one --lora FILE[:WEIGHT]")
    states = [(spec, read_adapter(spec.path)) for spec in specs]
    device = resolve_device(args.device)
    pipe = load_pipeline(
        args.model, device=device, dtype=resolve_dtype(args.dtype, device), model_config=args.model_config, quiet=True
    )
    runtime = LoRARuntime.attach(pipe)
    for name, (spec, state) in zip(_adapter_names(specs), states):
        runtime.add_adapter(name, state, spec.weight, source=str(spec.path))
    runtime.bake()
    if single_file:  # one original-layout checkpoint, as A1111 and ComfyUI load them
        from .single_file import save_single_file

        save_single_file(pipe, output)
        print(output)
        return 0
    with atomic_directory(output) as staging:
        pipe.save_pretrained(staging, safe_serialization=True)
    print(output)
    return 0


def _cmd_extract(args: argparse.Namespace) -> int:
    from .extract import ExtractOptions, extract_lora
    from .formats import write_adapter
    from .pipelines import load_pipeline, resolve_device, resolve_dtype
    from .reports import error_summary, worst_modules

    output = _output(args.out or f"{adapter_name_from_path(args.tuned)}-lora.safetensors")
    options = ExtractOptions(rank=args.rank, conv_rank=args.conv_rank, device=str(resolve_device(args.device)),
                             svd=args.svd, min_difference=args.min_difference)
    options.validate()  # before two models load
    dtype = resolve_dtype(args.dtype, "cpu")
    pipes = [load_pipeline(model, dtype=dtype, model_config=args.model_config, quiet=True)
             for model in (args.base, args.tuned)]
    base, tuned = (_components(pipe) for pipe in pipes)
    result = extract_lora(base, tuned, options)
    write_adapter(result.state, output, {"difflora.extract_base": str(args.base),
                                         "difflora.extract_tuned": str(args.tuned)}, layout=args.format)
    print(f"{error_summary(result.relative_errors)}; overall {result.overall_error:.3e}", file=sys.stderr)
    worst = ", ".join(f"{key} {error:.3e}" for key, error in worst_modules(result.relative_errors, 5))
    print(f"worst layers: {worst}", file=sys.stderr)
    if result.not_extracted:
        listed = ", ".join(result.not_extracted[:10]) + (", ..." if len(result.not_extracted) > 10 else "")
        print(f"not extracted: {len(result.not_extracted)} tensors differ that a LoRA does not hold (k×k convs "
              f"without --conv-rank, biases, norms, embeddings): {listed}", file=sys.stderr)
    print(output)
    return 0


def _components(pipe) -> dict:
    """The pipeline's models adapters change, by component name (``unet``, ``text_encoder``, ``text_encoder_2``)."""
    from .keys import COMPONENTS

    return {name: getattr(pipe, name) for name in COMPONENTS if getattr(pipe, name, None) is not None}


def _add_extract_parser(commands) -> None:
    from .extract import SVD_METHODS, ExtractOptions
    from .formats import WRITE_LAYOUTS

    extract = commands.add_parser("extract", help="a LoRA/LoCon from the difference of two models, with its error")
    extract.add_argument("--base", required=True, help="the base model: 'embedded', a diffusers folder, a "
                         "single-file .safetensors checkpoint or a hub id (as --model elsewhere)")
    extract.add_argument("--tuned", required=True, help="the fine-tuned model, named the same ways")
    extract.add_argument("--model-config", default=None,
                         help="architecture for single-file checkpoints (a diffusers folder or hub id)")
    extract.add_argument("--device", default="auto", help="where the SVDs run: auto, cpu, cuda, … (models load on "
                         "the CPU)")
    extract.add_argument("--dtype", default="auto", help="the models' dtype while loaded (the SVDs are fp32)")
    extract.add_argument("--rank", type=int, required=True, help=ExtractOptions.help_of("rank"))
    extract.add_argument("--conv-rank", type=int, default=None, help=ExtractOptions.help_of("conv_rank"))
    extract.add_argument("--svd", default="auto", choices=SVD_METHODS, help=ExtractOptions.help_of("svd"))
    extract.add_argument("--min-difference", type=float, default=0.0, help=ExtractOptions.help_of("min_difference"))
    extract.add_argument("--format", default="difflora", choices=WRITE_LAYOUTS)
    extract.add_argument("--out", default=None, help="output .safetensors (default: <tuned>-lora.safetensors)")
    extract.set_defaults(run=_cmd_extract, command_parser=extract)


def _add_blend_parser(commands) -> None:
    from .blend import BLEND_METHODS
    from .formats import WRITE_LAYOUTS

    blend_parser = commands.add_parser("blend", help="blend adapters with weights into one")
    blend_parser.add_argument("adapters", nargs="+", metavar="FILE[:WEIGHT]",
                              help="adapters and weights (negative allowed)")
    blend_parser.add_argument("--method", default="concat", choices=BLEND_METHODS,
                              help="concat: exact, rank = sum of ranks; svd: best rank-R approximation; "
                              "ties/dare: PEFT's merges")
    blend_parser.add_argument("--rank", type=int, default=None,
                              help="rank of the result (svd, ties, dare); with concat, the rank that LoHa, LoKr and "
                              "full diffs join the exact LoRA factors at (by SVD, error printed)")
    blend_parser.add_argument("--density", type=float, default=0.5, help="share of entries ties/dare keep")
    blend_parser.add_argument("--model", default=None,
                              help="the base model, needed only for DoRA modules (their change depends on its "
                              "weights; the blend holds that change as LoRA)")
    blend_parser.add_argument("--model-config", default=None, help="architecture of a single-file --model")
    blend_parser.add_argument("--format", default=None, choices=WRITE_LAYOUTS, help=FORMAT_HELP)
    blend_parser.add_argument("--out", required=True)
    blend_parser.set_defaults(run=_cmd_blend, command_parser=blend_parser)


FORMAT_HELP = "output layout (default: difflora, or kohya when the result holds LoHa, LoKr, full diffs or DoRA)"


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__
    from .formats import WRITE_LAYOUTS

    parser = OneLineErrorParser(
        prog="difflora", description="LoRA adapters for Stable Diffusion: generate, inspect, train, blend, export."
    )
    parser.add_argument("--version", action="version", version=f"difflora {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineErrorParser)

    init = commands.add_parser("init-model", help="write the embedded tiny Stable Diffusion to a folder")
    init.add_argument("dir", help="folder to create")
    init.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0: the embedded model)")
    init.set_defaults(run=_cmd_init_model, command_parser=init)

    gen = commands.add_parser("generate", help="generate images with any mix of adapters")
    add_model_options(gen)
    gen.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                     help="adapter file and weight (repeatable; weight may be negative)")
    gen.add_argument("--block-weights", default=None, metavar="down=…,mid=…,up=…",
                     help="per-block weights for every --lora (e.g. down=0,mid=1,up=1,up.1=0.5,te=1)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative-prompt", default="")
    gen.add_argument("--steps", type=int, default=20)
    gen.add_argument("--guidance", type=float, default=7.5)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--width", type=int, default=None, help="default: the model's native size")
    gen.add_argument("--height", type=int, default=None, help="default: the model's native size")
    gen.add_argument("--num-images", type=int, default=1)
    gen.add_argument("--fuse", action="store_true", help="fuse the adapters into the weights before generating")
    gen.add_argument("--strict", action="store_true",
                     help="refuse adapters holding keys difflora cannot apply (else they are listed)")
    gen.add_argument("--out", required=True, help="output PNG (several images get -0, -1, … suffixes)")
    gen.set_defaults(run=_cmd_generate, command_parser=gen)

    inspect = commands.add_parser("inspect", help="show an adapter file's format, ranks, alphas, modules and metadata")
    inspect.add_argument("file")
    inspect.add_argument("--json", action="store_true", help="print JSON")
    inspect.add_argument("--compat", action="store_true", help="also what diffusers, ComfyUI, A1111 and Forge apply")
    inspect.set_defaults(run=_cmd_inspect, command_parser=inspect)

    convert = commands.add_parser("convert", help="rewrite an adapter file in another format")
    convert.add_argument("input", metavar="IN", help="adapter file or folder (any format difflora reads)")
    convert.add_argument("--to", required=True, choices=(*WRITE_LAYOUTS, "peft"),
                         help="output format (peft: a folder with one PEFT adapter folder per component)")
    convert.add_argument("--out", required=True, help="output .safetensors (a new folder for --to peft)")
    convert.add_argument("--strict", action="store_true", help="fail if any key of IN cannot be carried over")
    convert.add_argument("--rank", type=int, default=None,
                         help="for --to diffusers/peft/difflora: the rank of the LoRA (by SVD, error printed) that "
                         "modules those formats cannot hold (LoHa, LoKr, full diffs) become")
    convert.set_defaults(run=_cmd_convert, command_parser=convert)

    _add_blend_parser(commands)

    scale = commands.add_parser("scale", help="bake a weight (and block weights) into an adapter file")
    scale.add_argument("input", metavar="IN")
    scale.add_argument("--weight", type=float, default=1.0)
    scale.add_argument("--block-weights", default=None, metavar="down=…,mid=…,up=…")
    scale.add_argument("--format", default=None, choices=WRITE_LAYOUTS, help=FORMAT_HELP)
    scale.add_argument("--out", required=True)
    scale.set_defaults(run=_cmd_scale, command_parser=scale)

    resize = commands.add_parser("resize", help="reduce an adapter's rank by SVD, reporting the error")
    resize.add_argument("input", metavar="IN")
    size = resize.add_mutually_exclusive_group(required=True)
    size.add_argument("--rank", type=int, help="new rank")
    size.add_argument("--energy", type=float,
                      help="keep the least rank holding this share of the squared singular values")
    resize.add_argument("--format", default=None, choices=WRITE_LAYOUTS, help=FORMAT_HELP)
    resize.add_argument("--out", required=True)
    resize.set_defaults(run=_cmd_resize, command_parser=resize)

    merge = commands.add_parser("merge", help="bake adapters into a model and write a full diffusers folder")
    add_model_options(merge)
    merge.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                       help="adapter and weight (repeatable)")
    merge.add_argument("--out", required=True,
                       help="new folder for a diffusers model, or FILE.safetensors for one single-file checkpoint")
    merge.set_defaults(run=_cmd_merge, command_parser=merge)

    _add_extract_parser(commands)

    # Listed for --help only: main() hands "difflora train/webui ..." over before parsing.
    commands.add_parser("train", help="train a LoRA style adapter (difflora train --help lists its options)")
    commands.add_parser("webui", help="start the web UI (difflora webui --help lists its options)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:
        # The training options (and their --help) come from TrainConfig; hand everything after "train" over.
        from .train import main as train_main

        return train_main(argv[1:])
    if argv[:1] == ["webui"]:
        from .webui import main as webui_main

        return webui_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet_libraries()
    return run_main(lambda: args.run(args), args.command_parser)


if __name__ == "__main__":
    sys.exit(main())
