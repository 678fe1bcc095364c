"""Outputs: every command that writes checks its output path before any work (one line, exit 2, nothing written, an
existing output unchanged), every image path of a batch included; a path the OS refuses is one line wherever it is
met; a write that fails at the OS level is one line naming the path, and several images are written all or none;
difflora never writes an adapter that reading would refuse (NaN or inf); what is published has the usual modes."""

import errno
import os
import stat
from pathlib import Path

import pytest
import torch
from PIL import Image

import difflora.formats as formats
import difflora.pipelines
from difflora._entry import run_main
from difflora._files import atomic_directory, atomic_path, check_output
from difflora.adapter import AdapterState, LoRAModuleWeights
from difflora.cli import main
from difflora.errors import AdapterFileError, DiffloraError, InvalidArgumentError
from difflora.formats import read_adapter, write_adapter, write_peft_folder
from difflora.generate import GenerationSettings, save_pngs

UNET_KEY = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
TEXT_KEY = "text_encoder.encoder.layers.0.self_attn.q_proj"


def small_adapter() -> AdapterState:
    """Two modules (UNet and text encoder) of the tiny model's sizes, non-zero."""
    generator = torch.Generator().manual_seed(0)
    modules = {key: LoRAModuleWeights(torch.randn(2, 32, generator=generator), torch.randn(32, 2, generator=generator),
                                      alpha=2.0) for key in (UNET_KEY, TEXT_KEY)}
    return AdapterState(modules=modules)


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path below ``folder`` with its bytes (``None`` for folders)."""
    return {str(path.relative_to(folder)): None if path.is_dir() else path.read_bytes() for path in folder.rglob("*")}


# The inputs named here do not exist and the model cannot load: a command that looked at them before its output
# would fail with another message.
MISSING = "missing.safetensors"
BAD_OUTPUTS = [
    (["generate", "--model", "no-model", "--prompt", "p", "--lora", MISSING, "--out", "G.safetensors/x.png"],
     "--out G.safetensors/x.png: G.safetensors is a file, not a folder"),
    (["generate", "--model", "no-model", "--prompt", "p", "--out", "folder.png"],
     "--out folder.png: is a folder; give a file path"),
    (["convert", MISSING, "--to", "kohya", "--out", "G.safetensors/x.safetensors"],
     "--out G.safetensors/x.safetensors: G.safetensors is a file, not a folder"),
    (["convert", MISSING, "--to", "difflora", "--out", "folder.safetensors"],
     "--out folder.safetensors: is a folder; give a file path"),
    (["convert", MISSING, "--to", "peft", "--out", "plain"], "--out plain: is a file; give a folder"),
    (["convert", MISSING, "--to", "peft", "--out", "full"], "--out full: exists and is not empty; give a new folder"),
    (["convert", MISSING, "--to", "peft", "--out", "p.pt"],
     "--out p.pt: .pt is a pickle suffix and difflora writes no pickles; give a folder name without it"),
    (["blend", MISSING, "--out", "b.bin"],
     "--out b.bin: .bin is a pickle suffix and difflora writes no pickles; give a path ending in .safetensors"),
    (["scale", MISSING, "--out", "s.pth"],
     "--out s.pth: .pth is a pickle suffix and difflora writes no pickles; give a path ending in .safetensors"),
    (["resize", MISSING, "--rank", "2", "--out", "G.safetensors/r.safetensors"],
     "--out G.safetensors/r.safetensors: G.safetensors is a file, not a folder"),
    (["merge", "--model", "no-model", "--lora", MISSING, "--out", "m.ckpt"],
     "--out m.ckpt: .ckpt is a pickle suffix and difflora writes no pickles; give a folder name without it"),
    (["merge", "--model", "no-model", "--lora", MISSING, "--out", "G.safetensors"],
     "--out G.safetensors: exists; give a new path"),
    (["merge", "--model", "no-model", "--lora", MISSING, "--out", "plain"], "--out plain: is a file; give a folder"),
    (["merge", "--model", "no-model", "--lora", MISSING, "--out", "full"],
     "--out full: exists and is not empty; give a new folder"),
    # A folder named like a file: a tool given that name expects a file.
    (["convert", MISSING, "--to", "peft", "--out", "x.safetensors"],
     "--out x.safetensors: .safetensors names a file, and this output is a folder; give a folder name without it"),
    (["merge", "--model", "no-model", "--lora", MISSING, "--out", "m.png"],
     "--out m.png: .png names a file, and this output is a folder; give a folder name without it"),
    (["init-model", "tiny.json"],
     "dir tiny.json: .json names a file, and this output is a folder; give a folder name without it"),
    (["init-model", "plain"], "dir plain: is a file; give a folder"),
    (["init-model", "G.safetensors/tiny"], "dir G.safetensors/tiny: G.safetensors is a file, not a folder"),
    (["train", "--data", "missing-data", "--model", "no-model", "--output", "plain"],
     "--output plain: is a file; give a folder"),
    (["train", "--data", "missing-data", "--model", "no-model", "--output", "G.safetensors/run"],
     "--output G.safetensors/run: G.safetensors is a file, not a folder"),
]


@pytest.mark.parametrize("argv, message", BAD_OUTPUTS, ids=[f"{argv[0]} {argv[-1]}" for argv, _ in BAD_OUTPUTS])
def test_a_bad_output_is_refused_before_any_work(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "G.safetensors").write_bytes(b"an existing output")
    (tmp_path / "plain").write_bytes(b"a file")
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "folder.safetensors").mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "model_index.json").write_text("{}")
    before = snapshot(tmp_path)
    assert main(argv) == 2
    assert capsys.readouterr().err == f"difflora: error: {message}\n"
    assert snapshot(tmp_path) == before  # nothing written, the existing outputs unchanged


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, where no file can be created")
@pytest.mark.parametrize("argv", [
    ["generate", "--model", "no-model", "--prompt", "p", "--lora", MISSING, "--out", "/proc/x.png"],
    ["scale", MISSING, "--out", "/proc/x.safetensors"],
    ["merge", "--model", "no-model", "--lora", MISSING, "--out", "/proc/merged"],
])
def test_an_output_where_nothing_can_be_created_is_refused_before_any_work(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"difflora: error: --out {argv[-1]}: cannot create a file in /proc ("), err


def test_check_output_names_its_parameter_and_creates_nothing(tmp_path):
    target = tmp_path / "new" / "deeper" / "out.safetensors"
    assert check_output(target, suffixes=(".safetensors",)) == target
    assert check_output(tmp_path / "run", "folder", parameter="output") == tmp_path / "run"
    assert list(tmp_path.iterdir()) == []  # no folder made, no probe left
    with pytest.raises(InvalidArgumentError) as caught:
        check_output(tmp_path / "out.png", suffixes=(".safetensors",), parameter="path")
    assert caught.value.parameter == "path"
    assert str(caught.value) == f"path {tmp_path / 'out.png'}: give a path ending in .safetensors"


def no_model_load(*args, **kwargs):
    raise AssertionError("the model was loaded before the outputs were checked")


def test_every_image_of_a_batch_has_its_path_checked_before_the_model_loads(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(difflora.pipelines, "load_pipeline", no_model_load)
    (tmp_path / "castle-1.png").mkdir()  # the second of castle-0.png, castle-1.png, castle-2.png
    (tmp_path / "castle.png").mkdir()  # not written when there are several images: no reason to refuse it
    before = snapshot(tmp_path)
    assert main(["generate", "--prompt", "p", "--num-images", "3", "--out", "castle.png"]) == 2
    assert capsys.readouterr().err == "difflora: error: --out castle-1.png: is a folder; give a file path\n"
    assert snapshot(tmp_path) == before


def test_several_images_are_written_all_or_none(tmp_path, monkeypatch):
    paths = [tmp_path / f"castle-{index}.png" for index in range(3)]
    paths[2].write_bytes(b"an image from an earlier run")
    save = Image.Image.save
    saved = []

    def full_disk_at_the_second_image(image, target, *args, **kwargs):
        saved.append(target)
        if len(saved) == 2:
            Path(target).write_bytes(b"part of a PNG")
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(image, target, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", full_disk_at_the_second_image)
    images = [Image.new("RGB", (8, 8), (index * 60, 0, 0)) for index in range(3)]
    settings = GenerationSettings("p", width=8, height=8, num_images=3)
    with pytest.raises(DiffloraError) as caught:
        save_pngs(images, paths, settings, model="m", scheduler="s", adapters=[])
    assert str(caught.value) == f"{paths[1]}: could not be written (No space left on device); nothing was written"
    assert sorted(tmp_path.iterdir()) == [paths[2]] and paths[2].read_bytes() == b"an image from an earlier run"
    monkeypatch.setattr(Image.Image, "save", save)
    assert save_pngs(images, paths, settings, model="m", scheduler="s", adapters=[]) == paths
    assert [Image.open(path).getpixel((0, 0)) for path in paths] == [(0, 0, 0), (60, 0, 0), (120, 0, 0)]


# ----- paths the OS refuses -----------------------------------------------------------------------------------------

LONG = "a" * 300  # one name past the 255 bytes of ext4, btrfs, xfs, APFS and NTFS
TOO_LONG = os.strerror(errno.ENAMETOOLONG)


@pytest.mark.parametrize("argv, line", [
    (["generate", "--prompt", "p", "--out", f"{LONG}.png"], f"--out {LONG}.png: {TOO_LONG}"),
    (["convert", "in.safetensors", "--to", "kohya", "--out", f"{LONG}.safetensors"],
     f"--out {LONG}.safetensors: {TOO_LONG}"),
    (["convert", "in.safetensors", "--to", "peft", "--out", f"{LONG}/peft"], f"--out {LONG}/peft: {TOO_LONG}"),
    (["inspect", f"{LONG}.safetensors"], f"{LONG}.safetensors: {TOO_LONG}"),
    (["generate", "--prompt", "p", "--lora", f"{LONG}.safetensors:0.5", "--out", "o.png"],
     f"{LONG}.safetensors: {TOO_LONG}"),
    (["train", "--data", LONG, "--output", "run"], f"data folder {LONG}: {TOO_LONG}"),
    (["train", "--data", "data", "--model", LONG, "--output", "run", "--report-to", "none"], f"{LONG}: {TOO_LONG}"),
], ids=["generate --out", "convert --out", "convert --to peft --out", "inspect", "generate --lora", "train --data",
        "train --model"])
def test_a_name_the_os_refuses_is_one_line_wherever_it_is_met(argv, line, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_adapter(small_adapter(), tmp_path / "in.safetensors")
    (tmp_path / "data").mkdir()
    Image.new("RGB", (64, 64), (200, 40, 40)).save(tmp_path / "data" / "red.png")
    before = snapshot(tmp_path)
    assert main(argv) == 2
    assert capsys.readouterr().err == f"difflora: error: {line}\n"
    assert snapshot(tmp_path) == before  # train: the model is loaded before config.yaml is written


def test_any_os_error_that_reaches_a_command_is_one_line(capsys):
    def denied():
        raise PermissionError(errno.EACCES, "Permission denied", "/srv/models/unet")

    def moved():
        raise OSError(errno.EXDEV, "Invalid cross-device link", "a.safetensors", None, "/mnt/b.safetensors")

    assert run_main(denied) == 2 and run_main(moved) == 2
    assert capsys.readouterr().err == (
        "difflora: error: /srv/models/unet: Permission denied\n"
        "difflora: error: a.safetensors → /mnt/b.safetensors: Invalid cross-device link\n")


# ----- what is written is what reading accepts ----------------------------------------------------------------------


def test_an_adapter_that_reading_would_refuse_is_never_written(tmp_path):
    state = small_adapter()
    state.modules[TEXT_KEY].up[3, 1] = float("inf")
    for write, target in ((write_adapter, tmp_path / "out.safetensors"), (write_peft_folder, tmp_path / "peft")):
        with pytest.raises(AdapterFileError) as caught:
            write(state, target)
        assert str(caught.value) == f"{target}: not written: the adapter's module {TEXT_KEY!r} holds NaN or inf values"
    assert list(tmp_path.iterdir()) == []


def test_scaling_past_what_the_factors_dtype_holds_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    state = small_adapter()
    for module in state.modules.values():
        module.up, module.down = module.up.half(), module.down.half()
    state.modules[UNET_KEY].up[0, 0] = 60000.0  # fits float16 (65504); twice it does not
    write_adapter(state, tmp_path / "half.safetensors")
    (tmp_path / "out.safetensors").write_bytes(b"an earlier output")
    before = snapshot(tmp_path)
    assert main(["scale", "half.safetensors", "--weight", "2", "--out", "out.safetensors"]) == 2
    assert capsys.readouterr().err == (
        f"difflora: error: out.safetensors: not written: the adapter's module {UNET_KEY!r} holds NaN or inf values\n")
    assert snapshot(tmp_path) == before
    assert main(["scale", "half.safetensors", "--weight", "1.05", "--out", "out.safetensors"]) == 0
    scaled = read_adapter(tmp_path / "out.safetensors").modules[UNET_KEY].up
    assert scaled.dtype == torch.float16 and float(scaled[0, 0]) == float(torch.tensor(63000.0).half())


# ----- failures while writing ---------------------------------------------------------------------------------------


def test_an_os_error_while_writing_a_file_is_one_line_naming_it(tmp_path):
    destination = tmp_path / "out.safetensors"
    destination.write_bytes(b"the previous version")
    with pytest.raises(DiffloraError) as caught:
        with atomic_path(destination) as temporary:
            temporary.write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert str(caught.value) == f"{destination}: could not be written (No space left on device); nothing was written"
    assert sorted(tmp_path.iterdir()) == [destination] and destination.read_bytes() == b"the previous version"


def test_an_os_error_while_writing_a_folder_is_one_line_naming_it(tmp_path):
    destination = tmp_path / "merged"
    with pytest.raises(DiffloraError) as caught:
        with atomic_directory(destination) as staging:
            (staging / "unet").mkdir()
            raise PermissionError(errno.EACCES, "Permission denied")
    assert str(caught.value) == f"{destination}: could not be written (Permission denied); nothing was written"
    assert list(tmp_path.iterdir()) == []


def test_a_disk_that_fills_up_during_a_command_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_adapter(small_adapter(), tmp_path / "in.safetensors")
    before = snapshot(tmp_path)

    def fill_the_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"part of a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(formats, "save_file", fill_the_disk)
    assert main(["convert", "in.safetensors", "--to", "kohya", "--out", "out.safetensors"]) == 2
    assert capsys.readouterr().err == (
        "difflora: error: out.safetensors: could not be written (No space left on device); nothing was written\n")
    assert snapshot(tmp_path) == before


# ----- modes --------------------------------------------------------------------------------------------------------


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_published_files_and_folders_have_the_usual_modes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_adapter(small_adapter(), tmp_path / "in.safetensors")
    assert main(["convert", "in.safetensors", "--to", "peft", "--out", "peft"]) == 0
    assert main(["convert", "in.safetensors", "--to", "kohya", "--out", "kohya.safetensors"]) == 0
    umask = current_umask()
    written = [tmp_path / "peft", *(tmp_path / "peft").rglob("*"), tmp_path / "kohya.safetensors"]
    assert {path.name for path in written} >= {"adapter_model.safetensors", "adapter_config.json", "unet"}
    for path in written:
        expected = (0o777 if path.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(path.stat().st_mode) == expected, (path, oct(path.stat().st_mode))
