"""Hostile adapter files through every command that reads one: one line ``difflora: error: …`` naming the file, exit
code 2, no traceback, nothing written and nothing changed; and the web UI's session says the same line.

Each kind of file is made the way such a file comes about (a download cut short, a header edited by hand, a pickle
renamed, a training run that diverged, a quantised export, an empty state dict saved), as raw bytes where
safetensors itself would refuse to write it. The matrix is command × kind, generated, one assertion per cell; the
files are built once per module.
Commands that load a model must refuse a bad file before loading it: the model loader raises in every cell but
those whose file only the model can refuse (a factor that does not fit its layer).
"""

import hashlib
import json
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors.torch import save_file

import difflora.pipelines
from difflora.cli import main
from difflora.errors import DiffloraError, first_line
from difflora.webui import AdapterSlot, BlendRequest, WebUISession

ROOT = Path(__file__).resolve().parent.parent
TO_Q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
TO_K = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
KOHYA_TO_Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
WIDTH = 32  # the tiny model's attention width in down_blocks.0 (to_q: 32 → 32)
RANK = 2
EARLIER_OUTPUT = b"an output written before this command ran"


# ----- the files, each as it comes about ---------------------------------------------------------------------------


def factors(seed: int = 0, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-zero down (rank × width) and up (width × rank) factors that fit the tiny model's ``down_blocks.0``."""
    generator = torch.Generator().manual_seed(seed)
    down = torch.randn(RANK, WIDTH, generator=generator) * 0.1
    up = torch.randn(WIDTH, RANK, generator=generator) * 0.1
    return down.to(dtype), up.to(dtype)


def diffusers_tensors(dtype=torch.float32) -> dict[str, torch.Tensor]:
    """What diffusers' ``save_lora_weights`` writes for two UNet projections."""
    tensors = {}
    for seed, module in enumerate((TO_Q, TO_K)):
        tensors[f"{module}.lora_A.weight"], tensors[f"{module}.lora_B.weight"] = factors(seed=seed, dtype=dtype)
    return tensors


# diffusers' header: the LoraConfig of each component, flattened as `<component>.<option>`.
LORA_CONFIG = {"unet.r": RANK, "unet.lora_alpha": RANK, "unet.target_modules": ["to_q", "to_k"]}
DIFFUSERS_HEADER = {"format": "pt", "lora_adapter_metadata": json.dumps(LORA_CONFIG)}


def diffusers_file(folder: Path, name: str, tensors: dict, header: dict | None = None) -> Path:
    path = folder / name
    save_file(tensors, str(path), metadata=DIFFUSERS_HEADER if header is None else header)
    return path


def raw_file(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


def raw_safetensors(header: dict, data: bytes) -> bytes:
    """A safetensors file by hand: 8-byte little-endian header length, the JSON header, the tensor data."""
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def good_bytes() -> bytes:
    return safetensors.torch.save(diffusers_tensors(), metadata=DIFFUSERS_HEADER)


def truncated_header(folder: Path) -> Path:
    data = good_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return raw_file(folder, "truncated-header.safetensors", data[: 8 + length // 2])


def truncated_data(folder: Path) -> Path:
    data = good_bytes()
    return raw_file(folder, "truncated-data.safetensors", data[: len(data) - 300])


def huge_header_length(folder: Path) -> Path:
    header = json.dumps({f"{TO_Q}.lora_A.weight": {"dtype": "F32", "shape": [RANK, WIDTH], "data_offsets": [0, 256]}})
    return raw_file(folder, "huge-header.safetensors", struct.pack("<Q", 2**62) + header.encode() + bytes(256))


def offsets_outside_file(folder: Path) -> Path:
    size = RANK * WIDTH * 4
    header = {
        f"{TO_Q}.lora_A.weight": {"dtype": "F32", "shape": [RANK, WIDTH], "data_offsets": [0, size]},
        f"{TO_Q}.lora_B.weight": {"dtype": "F32", "shape": [WIDTH, RANK], "data_offsets": [2**40, 2**40 + size]},
    }
    return raw_file(folder, "offsets.safetensors", raw_safetensors(header, bytes(2 * size)))


class RunsCodeWhenUnpickled:
    """What a malicious checkpoint holds: unpickling it calls ``open(marker, "w")``, creating the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def pickle_in_disguise(folder: Path) -> Path:
    payload = {"state_dict": diffusers_tensors(), "hook": RunsCodeWhenUnpickled(folder / "pickle-ran")}
    return raw_file(folder, "pickle.safetensors", pickle.dumps(payload, protocol=2))


def torch_save_in_disguise(folder: Path) -> Path:
    path = folder / "torch-save.safetensors"
    torch.save({"state_dict": diffusers_tensors(), "hook": RunsCodeWhenUnpickled(folder / "pickle-ran")}, path)
    return path


def folder_named_like_a_file(folder: Path) -> Path:
    path = folder / "folder.safetensors"
    path.mkdir()
    (path / "README.md").write_text("downloaded as a folder\n")
    return path


def with_value(name: str, key: str, value: float, dtype=torch.float32):
    """The good file with one entry of one factor set to ``value`` (a run that diverged, an fp16 overflow)."""

    def make(folder: Path) -> Path:
        tensors = diffusers_tensors(dtype)
        tensors[key][1, 1] = value
        return diffusers_file(folder, name, tensors)

    return make


def with_tensors(name: str, **replaced: torch.Tensor):
    """The good file with factors of ``TO_Q`` replaced (``A=…``/``B=…``; ``None`` removes one)."""

    def make(folder: Path) -> Path:
        tensors = diffusers_tensors()
        for factor, tensor in replaced.items():
            key = f"{TO_Q}.lora_{factor}.weight"
            if tensor is None:
                del tensors[key]
            else:
                tensors[key] = tensor
        return diffusers_file(folder, name, tensors)

    return make


def with_adapter_metadata(name: str, text: str):
    def make(folder: Path) -> Path:
        return diffusers_file(folder, name, diffusers_tensors(), {"format": "pt", "lora_adapter_metadata": text})

    return make


def kohya_file(name: str, down_value: float | None = None, alpha: torch.Tensor | None = None):
    """What kohya's sd-scripts write (fp16 factors, ``.alpha`` as a 0-d tensor, ``ss_*`` header), with a NaN in the
    down factor or another alpha."""

    def make(folder: Path) -> Path:
        down, up = factors(dtype=torch.float16)
        if down_value is not None:
            down[0, 3] = down_value
        tensors = {
            f"{KOHYA_TO_Q}.lora_down.weight": down,
            f"{KOHYA_TO_Q}.lora_up.weight": up,
            f"{KOHYA_TO_Q}.alpha": torch.tensor(1.0, dtype=torch.float16) if alpha is None else alpha,
        }
        path = folder / name
        save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(RANK)})
        return path

    return make


def peft_folder(name: str, config: str, tensors: dict | None = None):
    """A PEFT adapter folder (``save_pretrained``) with the given ``adapter_config.json`` text."""

    def make(folder: Path) -> Path:
        path = folder / name
        path.mkdir()
        (path / "adapter_config.json").write_text(config)
        weights = tensors if tensors is not None else diffusers_tensors()
        prefixed = {"base_model.model." + key.removeprefix("unet."): value for key, value in weights.items()}
        save_file(prefixed, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
        return path

    return make


def nan_tensors() -> dict:
    tensors = diffusers_tensors()
    tensors[f"{TO_K}.lora_B.weight"][0, 0] = float("nan")
    return tensors


def peft_config(**changed) -> str:
    """``adapter_config.json`` as PEFT's ``save_pretrained`` writes it (the fields difflora reads), with changes."""
    config = {"peft_type": "LORA", "r": RANK, "lora_alpha": RANK, "target_modules": ["to_q", "to_k"], **changed}
    return json.dumps(config, indent=2)


PEFT_CONFIG = peft_config()

def zero_tensors(folder: Path) -> Path:
    """A sound safetensors file holding no tensors, as ``save_file`` writes it for an empty state dict (a training
    script that saved before adding its adapter, an export filtered down to nothing)."""
    path = folder / "zero-tensors.safetensors"
    save_file({}, str(path), metadata=DIFFUSERS_HEADER)
    return path


KINDS = {
    "empty": lambda folder: raw_file(folder, "empty.safetensors", b""),
    "zero-tensors": zero_tensors,
    "truncated-header": truncated_header,
    "truncated-data": truncated_data,
    "huge-header-length": huge_header_length,
    "offsets-outside-file": offsets_outside_file,
    "rank-zero": with_tensors("rank-zero.safetensors", A=torch.zeros(0, WIDTH), B=torch.zeros(WIDTH, 0)),
    "empty-in-features": with_tensors("empty-in.safetensors", A=torch.zeros(RANK, 0)),
    "pickle-in-disguise": pickle_in_disguise,
    "torch-save-in-disguise": torch_save_in_disguise,
    "folder-named-like-a-file": folder_named_like_a_file,
    "nan-factor": with_value("nan.safetensors", f"{TO_Q}.lora_A.weight", float("nan")),
    # fp16 holds at most 65504: an fp32 factor cast down to save space becomes inf
    "inf-factor-fp16": with_value("inf.safetensors", f"{TO_K}.lora_B.weight", 1e5, torch.float16),
    "inner-ranks-differ": with_tensors("ranks-differ.safetensors", B=torch.ones(WIDTH, RANK + 1)),
    "factor-3d": with_tensors("three-d.safetensors", A=torch.ones(RANK, WIDTH, 1)),
    "integer-factors": with_tensors(
        "int8.safetensors", A=torch.ones(RANK, WIDTH, dtype=torch.int8), B=torch.ones(WIDTH, RANK, dtype=torch.int8)
    ),
    "half-pair-missing": with_tensors("half.safetensors", B=None),
    "metadata-not-json": with_adapter_metadata("metadata.safetensors", str({"unet.r": RANK})),
    "metadata-not-object": with_adapter_metadata("metadata-list.safetensors", "[2, 2]"),
    "kohya-nan": kohya_file("kohya-nan.safetensors", down_value=float("nan")),
    "kohya-alpha-nan": kohya_file("kohya-alpha.safetensors", alpha=torch.tensor(float("nan"))),
    "kohya-alpha-zero": kohya_file("kohya-alpha-zero.safetensors", alpha=torch.tensor(0.0)),
    "kohya-alpha-vector": kohya_file("kohya-alpha-vector.safetensors", alpha=torch.ones(RANK)),
    "peft-config-not-json": peft_folder("peft-truncated", PEFT_CONFIG[: len(PEFT_CONFIG) // 2]),
    "peft-config-not-object": peft_folder("peft-list", json.dumps([PEFT_CONFIG])),
    "peft-alpha-not-number": peft_folder("peft-alpha", peft_config(lora_alpha={"to_q": RANK})),
    "peft-nan": peft_folder("peft-nan", PEFT_CONFIG, nan_tensors()),
}
# A file that is sound by itself but does not fit the model: only commands that load one can refuse it.
MODEL_KINDS = {"misfit-for-model": with_tensors("misfit.safetensors", A=torch.ones(RANK, 7))}  # to_q takes 32


@pytest.fixture(scope="module")
def hostile_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("hostile")
    return {kind: make(folder) for kind, make in {**KINDS, **MODEL_KINDS}.items()}


@pytest.fixture(scope="module")
def good_file(tmp_path_factory) -> Path:
    return diffusers_file(tmp_path_factory.mktemp("good"), "good.safetensors", diffusers_tensors())


# ----- the commands -------------------------------------------------------------------------------------------------

# name → (arguments, split at spaces before the paths go in; output name: a trailing "/" makes it a folder, None
# when the command writes nothing)
COMMANDS = {
    "inspect": ("inspect {file}", None),
    "inspect --json": ("inspect {file} --json", None),
    "convert --to difflora": ("convert {file} --to difflora --out {out}", "out.safetensors"),
    "convert --to kohya": ("convert {file} --to kohya --out {out}", "out.safetensors"),
    "convert --to peft": ("convert {file} --to peft --out {out}", "out-peft/"),
    "blend concat": ("blend {good} {file} --out {out}", "blend.safetensors"),
    "blend svd": ("blend {good} {file} --method svd --rank 1 --out {out}", "blend.safetensors"),
    "blend ties": ("blend {good} {file} --method ties --rank 1 --out {out}", "blend.safetensors"),
    "blend dare": ("blend {good} {file} --method dare --rank 1 --out {out}", "blend.safetensors"),
    "scale": ("scale {file} --weight 0.5 --out {out}", "scaled.safetensors"),
    "resize": ("resize {file} --rank 1 --out {out}", "resized.safetensors"),
    "generate": ("generate --model {model} --lora {file} --prompt castle --steps 1 --out {out}", "image.png"),
    "merge --out folder/": ("merge --model {model} --lora {file} --out {out}", "merged/"),
    "merge --out file.safetensors": ("merge --model {model} --lora {file} --out {out}", "merged.safetensors"),
}
MODEL_COMMANDS = ("generate", "merge --out folder/", "merge --out file.safetensors")
# merge refuses any existing output (it never overwrites a model); the others may replace an output, so a refused
# input must leave the one that was there as it was.
KEEPS_NO_EARLIER_OUTPUT = ("merge --out file.safetensors",)

CELLS = [(command, kind) for command in COMMANDS for kind in KINDS]
CELLS += [(command, kind) for command in MODEL_COMMANDS for kind in MODEL_KINDS]


def snapshot(path: Path) -> dict[str, str]:
    """Every file and folder at or under ``path``, with a digest of each file's bytes."""
    if not path.exists():
        return {}
    paths = [path, *sorted(path.rglob("*"))] if path.is_dir() else [path]
    return {
        str(item.relative_to(path.parent)): "folder" if item.is_dir() else hashlib.sha256(item.read_bytes()).hexdigest()
        for item in paths
    }


def refusal_problems(code, stderr: str, named: str) -> list[str]:
    """What differs from a refusal: exit code 2 and exactly one ``difflora: error:`` line naming ``named``."""
    problems = [] if code == 2 else [f"exit code {code!r}, expected 2"]
    lines = stderr.splitlines()
    if "Traceback" in stderr:
        problems.append("a traceback")
    if len(lines) != 1 or not lines[0].startswith("difflora: error: "):
        problems.append(f"stderr is not one 'difflora: error:' line: {stderr[-500:]!r}")
    elif named not in lines[0]:
        problems.append(f"the line does not name {named}: {lines[0]!r}")
    return problems


def run_in_process(argv: list[str], capsys) -> tuple[object, str]:
    try:
        code = main(argv)
    except SystemExit as exit:
        code = exit.code
    except Exception as error:  # what would reach the user as a traceback
        code = f"raised {type(error).__name__}: {first_line(error)}"
    return code, capsys.readouterr().err


def run_cell(command: str, file: Path, good: Path, model: Path, folder: Path, earlier: bytes | None, run) -> list[str]:
    """Run ``command`` on ``file`` with its output in ``folder`` (holding ``earlier`` there first, when given: bytes
    for a file, an empty folder for a folder); the ways the run differs from a clean refusal."""
    arguments, output_name = COMMANDS[command]
    folder.mkdir()
    output = folder / output_name.rstrip("/") if output_name else folder / "none"
    if earlier is not None and output_name:
        output.mkdir() if output_name.endswith("/") else output.write_bytes(earlier)
    before = {"outputs": snapshot(folder), "file": snapshot(file), "good": snapshot(good)}
    values = {"file": str(file), "good": str(good), "model": str(model), "out": str(output)}
    code, stderr = run([argument.format(**values) for argument in arguments.split()])
    problems = refusal_problems(code, stderr, named=str(file))
    after = {"outputs": snapshot(folder), "file": snapshot(file), "good": snapshot(good)}
    problems += [f"{what} changed: {before[what]} → {after[what]}" for what in before if before[what] != after[what]]
    if (file.parent / "pickle-ran").exists():
        problems.append("the pickle ran")
    return problems


@pytest.mark.parametrize("command, kind", CELLS, ids=[f"{command}|{kind}" for command, kind in CELLS])
def test_every_command_refuses_every_hostile_file(
    command, kind, hostile_files, good_file, tiny_model_dir, tmp_path, capsys, monkeypatch
):
    if kind not in MODEL_KINDS:  # a bad file must be refused before the (slow) model load

        def no_model_load(*args, **kwargs):
            raise AssertionError("the model was loaded before the adapter was read")

        monkeypatch.setattr(difflora.pipelines, "load_pipeline", no_model_load)

    def run(argv):
        return run_in_process(argv, capsys)

    file = hostile_files[kind]
    problems = run_cell(command, file, good_file, tiny_model_dir, tmp_path / "new", None, run)
    if COMMANDS[command][1] and command not in KEEPS_NO_EARLIER_OUTPUT:
        problems += [f"(earlier output) {problem}" for problem in run_cell(
            command, file, good_file, tiny_model_dir, tmp_path / "earlier", EARLIER_OUTPUT, run
        )]
    assert problems == [], f"{command} on a {kind} file"


def run_subprocess(argv: list[str]) -> tuple[int, str]:
    result = subprocess.run(
        [sys.executable, "-m", "difflora", *argv], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    return result.returncode, result.stderr


@pytest.mark.parametrize("command, kind", [("inspect", "nan-factor"), ("blend svd", "kohya-nan")])
def test_the_real_entry_point_refuses_without_a_traceback(command, kind, hostile_files, good_file, tmp_path):
    problems = run_cell(command, hostile_files[kind], good_file, Path("embedded"), tmp_path / "run", EARLIER_OUTPUT,
                        run_subprocess)
    assert problems == [], f"python -m difflora {command} on a {kind} file"


# ----- the web UI ---------------------------------------------------------------------------------------------------

UI_KINDS = ("nan-factor", "inf-factor-fp16", "kohya-nan", "offsets-outside-file")


@pytest.fixture(scope="module")
def session(hostile_files, good_file, tiny_model_dir, tmp_path_factory):
    """A web UI session whose adapter folder holds the good file and copies of :data:`UI_KINDS`."""
    lora_dir = tmp_path_factory.mktemp("webui-loras")
    (lora_dir / good_file.name).write_bytes(good_file.read_bytes())
    for kind in UI_KINDS:
        (lora_dir / hostile_files[kind].name).write_bytes(hostile_files[kind].read_bytes())
    return WebUISession(difflora.pipelines.load_pipeline(tiny_model_dir, quiet=True), lora_dir)


def error_problems(action, named: str) -> list[str]:
    """What differs from a one-line :class:`DiffloraError` naming ``named`` when ``action()`` runs."""
    try:
        action()
    except DiffloraError as error:
        message = str(error)
        return [] if "\n" not in message and named in message else [f"not one line naming {named}: {message!r}"]
    except Exception as error:  # what the page shows as "Something went wrong on the server"
        return [f"raised {type(error).__name__}: {first_line(error)}"]
    return ["accepted"]


@pytest.mark.parametrize("kind", UI_KINDS)
def test_web_ui_refuses_a_hostile_upload_in_one_line(kind, session, hostile_files):
    upload = hostile_files[kind]
    before = snapshot(session.root)
    problems = error_problems(lambda: session.inspect_upload(upload), upload.name)
    problems += error_problems(lambda: session.add_upload(upload, name=f"added-{kind}"), upload.name)
    problems += [] if snapshot(session.root) == before else ["the adapter folder changed"]
    assert problems == []


@pytest.mark.parametrize("method", ["concat", "svd"])
@pytest.mark.parametrize("kind", UI_KINDS)
def test_web_ui_blend_of_a_hostile_file_is_one_line(kind, method, session, hostile_files, good_file):
    name = hostile_files[kind].name
    request = BlendRequest([AdapterSlot(good_file.name, 1.0), AdapterSlot(name, 0.5)], method=method,
                           rank=2 if method == "svd" else None)
    before = snapshot(session.root)
    problems = error_problems(lambda: session.blend(request), name)
    problems += error_problems(lambda: session.save_blend(request, f"mixed-{kind}-{method}"), name)
    problems += [] if snapshot(session.root) == before else ["the adapter folder changed"]
    assert problems == []
