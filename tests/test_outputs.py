"""Outputs: every command that writes checks its output path before any work (one line, exit 2, nothing written, an
existing output unchanged); a write that fails at the OS level is one line naming the path; what is published has the
usual modes."""

import errno
import os
import stat
from pathlib import Path

import pytest
import torch

import difflora.formats as formats
from difflora._files import atomic_directory, atomic_path, check_output
from difflora.adapter import AdapterState, LoRAModuleWeights
from difflora.cli import main
from difflora.errors import DiffloraError, InvalidArgumentError
from difflora.formats import write_adapter

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
