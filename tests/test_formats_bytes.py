"""What difflora writes, pinned: every layout of two small hand-made adapters, digested as written before the formats
package was split into one module per dialect. A change here changes the files users get; make it on purpose.

safetensors (0.8) orders a header's metadata at random on every write, so a file is compared as its header parsed
from JSON (metadata, tensor names, dtypes, shapes, offsets) plus its tensor data byte for byte.
"""

import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch

import difflora._version
from difflora.adapter import AdapterState, LoRAModuleWeights
from difflora.formats import write_adapter, write_peft_folder

UNET = "unet.{}.attentions.{}.transformer_blocks.0.{}"
# (state, layout) → sha256 of the canonical file (or folder); recorded with the code of commit 00792e3, but sdxl/peft:
# changed on purpose with issue 11, its text_encoder_2 folder now naming layers as CLIPTextModelWithProjection does
# (``text_model.encoder…``); before, PeftModel.from_pretrained found none of its weights and loaded nothing.
EXPECTED = {
    ("sd15", "difflora"): "5ab30a884b42ad98f9e1cea37a238a1ede569ed9d6d33119928f36b1714fa081",
    ("sd15", "diffusers"): "5ab30a884b42ad98f9e1cea37a238a1ede569ed9d6d33119928f36b1714fa081",
    ("sd15", "kohya"): "f3054af4ba2f49d92ad737adccff7d6c4911af9ec0776e0c6a8df38788297e8c",
    ("sd15", "peft"): "b63e922273adafb3c461eb5057c27ccac984fb9a70c49b5844587bc1f0c1f959",
    ("sdxl", "difflora"): "d81afc1c1015f9e8321e0a003c87c20b06259d72a96f53d48b1b0b51bec8b0d8",
    ("sdxl", "diffusers"): "d81afc1c1015f9e8321e0a003c87c20b06259d72a96f53d48b1b0b51bec8b0d8",
    ("sdxl", "kohya"): "feaf2c04911bb1560f9a88b57a34b9fab44dd513405ecb79295165b52a706c22",
    ("sdxl", "peft"): "6b984fa9fa62376ec6786ca530239b94a87e9b1d0b5122adefe621a0008bda28",
}


def module(rank: int, fan_out: int, fan_in: int, offset: int, alpha: float, use_rslora: bool = False):
    """Factors with values exact in binary (multiples of 1/8), so the data bytes depend on nothing but the code."""
    down = ((torch.arange(rank * fan_in) + offset) % 7 - 3).reshape(rank, fan_in).float() / 8
    up = ((torch.arange(fan_out * rank) + 2 * offset) % 5 - 2).reshape(fan_out, rank).float() / 8
    return LoRAModuleWeights(down=down, up=up, alpha=alpha, use_rslora=use_rslora)


def sd15_adapter() -> AdapterState:
    """Two ranks and alphas (rank and alpha patterns), UNet and text encoder, metadata that travels."""
    modules = {
        UNET.format("down_blocks.0", 0, "attn1.to_q"): module(4, 8, 8, 0, alpha=8.0),
        UNET.format("down_blocks.0", 0, "attn1.to_out.0"): module(2, 8, 8, 1, alpha=3.0),
        UNET.format("mid_block", 0, "attn2.to_k"): module(4, 16, 12, 2, alpha=8.0),
        UNET.format("up_blocks.1", 2, "attn2.to_v"): module(4, 8, 12, 3, alpha=8.0),
        "text_encoder.encoder.layers.0.self_attn.q_proj": module(4, 6, 6, 4, alpha=8.0),
        "text_encoder.encoder.layers.1.self_attn.out_proj": module(2, 6, 6, 5, alpha=3.0),
    }
    return AdapterState(modules=modules, metadata={"difflora.base_model": "embedded", "ss_network_dim": "99"})


def sdxl_adapter() -> AdapterState:
    """Two text encoders (kohya's te1/te2 names, SDXL metadata) and rsLoRA beside plain LoRA in one component."""
    modules = {
        UNET.format("down_blocks.1", 1, "attn1.to_k"): module(4, 10, 10, 6, alpha=6.0, use_rslora=True),
        UNET.format("up_blocks.0", 0, "attn2.to_out.0"): module(4, 10, 10, 7, alpha=6.0, use_rslora=True),
        "text_encoder.encoder.layers.0.self_attn.v_proj": module(2, 6, 6, 8, alpha=2.0),
        "text_encoder_2.encoder.layers.3.self_attn.k_proj": module(4, 6, 6, 9, alpha=2.0, use_rslora=True),
        "text_encoder_2.encoder.layers.4.self_attn.q_proj": module(4, 6, 6, 10, alpha=4.0),
    }
    return AdapterState(modules=modules, metadata={"lora_adapter_metadata": "{}"})


ADAPTERS = {"sd15": sd15_adapter, "sdxl": sdxl_adapter}


def canonical_safetensors(path: Path) -> bytes:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    return json.dumps(header, sort_keys=True).encode() + data[8 + length :]


def digest(written: Path) -> str:
    files = sorted(p for p in written.rglob("*") if p.is_file()) if written.is_dir() else [written]
    sha = hashlib.sha256()
    for path in files:
        sha.update(str(path.relative_to(written.parent)).encode())
        sha.update(canonical_safetensors(path) if path.suffix == ".safetensors" else path.read_bytes())
    return sha.hexdigest()


@pytest.mark.parametrize("adapter, layout", sorted(EXPECTED), ids=["-".join(case) for case in sorted(EXPECTED)])
def test_written_files_stay_what_they_were(adapter, layout, tmp_path, monkeypatch):
    monkeypatch.setattr(difflora._version, "__version__", "0.0.0-pinned")  # written too; pinned is the layout
    state = ADAPTERS[adapter]()
    if layout == "peft":
        written = write_peft_folder(state, tmp_path / "out")
    else:
        written = write_adapter(state, tmp_path / "out.safetensors", {"note": "pinned"}, layout=layout)
    assert digest(written) == EXPECTED[adapter, layout], f"{adapter}/{layout} is written differently than it was"
