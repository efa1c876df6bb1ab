"""Checkpoint files -> models (models/loading.py), through the same code path real files take:
a tiny FLUX.1 transformer is written to disk as a single safetensors file, as shards with an
index, and as a folder, then read back with load_state_dict + Flux.from_state_dict."""
import json
import pickle
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from models.flux import Flux, FluxParams, img_ids, pack, txt_ids
from models.loading import CheckpointReadError, load_into, load_state_dict

PARAMS = FluxParams(hidden_size=64, num_heads=2, axes_dim=[4, 14, 14], depth=1, depth_single_blocks=1,
                    context_in_dim=16, vec_in_dim=8, guidance_embed=True)


def tiny_flux_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.detach().clone() for k, v in Flux(PARAMS).state_dict().items()}


def run(model: Flux) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    dtype = model.img_in.weight.dtype
    with torch.no_grad():
        return model(
            img=pack(torch.randn(1, 16, 4, 6, generator=g)).to(dtype),
            img_ids=img_ids(1, 4, 6),
            txt=torch.randn(1, 3, PARAMS.context_in_dim, generator=g).to(dtype),
            txt_ids=txt_ids(1, 3),
            timesteps=torch.tensor([0.5]),
            y=torch.randn(1, PARAMS.vec_in_dim, generator=g).to(dtype),
            guidance=torch.tensor([3.5]),
        )


def write_sharded(sd: dict, folder: Path, n_shards: int = 3) -> Path:
    """Shards plus a `model.safetensors.index.json` weight map, as Hugging Face writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = sorted(sd)
    weight_map = {}
    for i in range(n_shards):
        name = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        shard = {k: sd[k] for k in keys[i::n_shards]}
        save_file(shard, str(folder / name))
        weight_map.update({k: name for k in shard})
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


def mapped_file(tensor: torch.Tensor) -> str | None:
    """The file whose memory mapping holds the tensor's data, from /proc/self/maps, or None
    when the tensor lives in ordinary (anonymous) memory."""
    address = tensor.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        low, high = (int(x, 16) for x in fields[0].split("-"))
        if low <= address < high:
            return fields[5] if len(fields) == 6 and fields[5].startswith("/") else None
    return None


@pytest.fixture(scope="module")
def reference():
    sd = tiny_flux_state_dict()
    return sd, run(Flux.from_state_dict(dict(sd), axes_dim=PARAMS.axes_dim))


@pytest.mark.parametrize("layout", ["single_file", "index", "folder_with_index", "folder_of_shards"])
def test_layouts_load_the_same_model(tmp_path, reference, layout):
    sd, expected = reference
    if layout == "single_file":
        path = tmp_path / "flux1-tiny.safetensors"
        save_file(sd, str(path))
    elif layout == "index":
        path = write_sharded(sd, tmp_path / "shards")
    elif layout == "folder_with_index":
        path = write_sharded(sd, tmp_path / "shards").parent
    else:  # a folder of *.safetensors without an index: every file is read
        keys = sorted(sd)
        for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :])):
            save_file({k: sd[k] for k in part}, str(tmp_path / f"part{i}.safetensors"))
        path = tmp_path
    loaded = load_state_dict(path)
    assert loaded.keys() == sd.keys()
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)
    model = Flux.from_state_dict(loaded, axes_dim=PARAMS.axes_dim)
    # Not bitwise: mapped tensors sit at the file's offsets (not 64-byte aligned), and the
    # CPU matmul picks a different code path for unaligned data.
    assert torch.allclose(run(model), expected, rtol=0, atol=1e-5)


def test_folder_with_two_checkpoints_is_refused(tmp_path, reference):
    # every *.safetensors in a folder is read: two whole checkpoints must not silently merge
    sd, _ = reference
    save_file(sd, str(tmp_path / "flux1-dev.safetensors"))
    save_file({k: v + 1 for k, v in sd.items()}, str(tmp_path / "flux1-dev-finetune.safetensors"))
    with pytest.raises(ValueError, match="is in both flux1-dev-finetune.safetensors and flux1-dev.safetensors"):
        load_state_dict(tmp_path)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc to see memory mappings")
@pytest.mark.parametrize("dtype", [None, torch.float32], ids=["file_dtype", "same_dtype_given"])
def test_matching_dtype_is_memory_mapped_not_copied(tmp_path, dtype):
    path = tmp_path / "flux1-tiny.safetensors"
    save_file(tiny_flux_state_dict(), str(path))
    sd = load_state_dict(path)
    pointers = {k: v.data_ptr() for k, v in sd.items()}
    model = Flux.from_state_dict(sd, dtype=dtype, axes_dim=PARAMS.axes_dim)
    for key, tensor in model.state_dict().items():
        assert tensor.data_ptr() == pointers[key], f"{key} was copied"
        assert mapped_file(tensor) == str(path), f"{key} is not backed by the file"


def test_bf16_conversion(tmp_path, reference):
    sd, _ = reference
    path = tmp_path / "flux1-tiny.safetensors"
    save_file(sd, str(path))
    model = Flux.from_state_dict(load_state_dict(path), dtype=torch.bfloat16, axes_dim=PARAMS.axes_dim)
    for key, tensor in model.state_dict().items():
        assert tensor.dtype == torch.bfloat16, key
        assert torch.equal(tensor, sd[key].to(torch.bfloat16)), key
    assert run(model).isfinite().all()


@pytest.mark.skipif(not hasattr(torch, "float8_e4m3fn"), reason="this torch has no float8_e4m3fn")
def test_fp8_file_upcasts_to_bf16_by_default(tmp_path, reference):
    sd, _ = reference
    fp8 = {k: v.to(torch.float8_e4m3fn) for k, v in sd.items()}
    path = tmp_path / "flux1-tiny-fp8.safetensors"
    save_file(fp8, str(path))
    model = Flux.from_state_dict(load_state_dict(path), axes_dim=PARAMS.axes_dim)
    for key, tensor in model.state_dict().items():
        assert tensor.dtype == torch.bfloat16, key
        assert torch.equal(tensor, fp8[key].to(torch.bfloat16)), key
    explicit = Flux.from_state_dict(load_state_dict(path), dtype=torch.float32, axes_dim=PARAMS.axes_dim)
    assert explicit.img_in.weight.dtype == torch.float32


SDXL_LIKE = {
    "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
    "model.diffusion_model.label_emb.0.0.weight": torch.zeros(1280, 2816),
    "conditioner.embedders.0.transformer.text_model.embeddings.position_ids": torch.zeros(1, 77),
    "first_stage_model.encoder.conv_in.weight": torch.zeros(128, 3, 3, 3),
}
VAE_LIKE = {
    "encoder.conv_in.weight": torch.zeros(128, 3, 3, 3),
    "encoder.down.0.block.0.conv1.weight": torch.zeros(128, 128, 3, 3),
    "decoder.up.0.block.0.conv1.weight": torch.zeros(128, 128, 3, 3),
}


@pytest.mark.parametrize("sd, found", [(SDXL_LIKE, "SDXL"), (VAE_LIKE, "autoencoder")], ids=["sdxl", "vae"])
def test_wrong_file_says_what_it_found(tmp_path, sd, found):
    path = tmp_path / "not-flux.safetensors"
    save_file(sd, str(path))
    with pytest.raises(ValueError) as error:
        Flux.from_state_dict(load_state_dict(path))
    message = str(error.value)
    assert "FLUX" in message and found in message, message


def test_missing_and_unexpected_keys_are_listed(reference):
    sd = dict(reference[0])
    del sd["double_blocks.0.img_mlp.2.bias"]
    del sd["single_blocks.0.linear2.weight"]
    sd["double_blocks.0.img_attn.lora_down.weight"] = torch.zeros(4, PARAMS.hidden_size)
    with pytest.raises(ValueError) as error:
        Flux.from_state_dict(sd, axes_dim=PARAMS.axes_dim)
    message = str(error.value)
    assert "2 missing, 1 unexpected" in message, message
    for key in ("double_blocks.0.img_mlp.2.bias", "single_blocks.0.linear2.weight",
                "double_blocks.0.img_attn.lora_down.weight"):
        assert key in message, message


def test_wrong_shape_names_the_key(reference):
    sd = dict(reference[0])
    sd["double_blocks.0.txt_mlp.0.weight"] = torch.zeros(5, PARAMS.hidden_size)
    with pytest.raises(ValueError, match=r"double_blocks\.0\.txt_mlp\.0\.weight has shape \(5, 64\)"):
        Flux.from_state_dict(sd, axes_dim=PARAMS.axes_dim)


class NotATensor:
    """Any object that is not plain tensors and containers: weights_only=True refuses it."""


def test_pickle_checkpoint_needs_allow_pickle(tmp_path, reference):
    sd, expected = reference
    path = tmp_path / "flux1-tiny.ckpt"
    torch.save({"state_dict": sd}, path)  # Lightning-style nesting
    with pytest.raises(ValueError, match="pickle.*allow_pickle=True"):
        load_state_dict(path)
    loaded = load_state_dict(path, allow_pickle=True)
    assert torch.allclose(run(Flux.from_state_dict(loaded, axes_dim=PARAMS.axes_dim)), expected, rtol=0, atol=1e-5)
    # allow_pickle still reads with weights_only=True: arbitrary objects are not unpickled
    unsafe = tmp_path / "unsafe.ckpt"
    torch.save({**sd, "payload": NotATensor()}, unsafe)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_state_dict(unsafe, allow_pickle=True)


def test_other_dtype_is_converted_into_new_tensors(reference):
    # the complement of the memory-map test: a dtype change must make real (non-meta) copies
    sd = dict(reference[0])
    with torch.device("meta"):
        model = Flux(PARAMS)
    pointers = {k: v.data_ptr() for k, v in sd.items()}
    load_into(model, sd, dtype=torch.bfloat16)
    assert all(model.state_dict()[k].data_ptr() != pointers[k] for k in sd)
    assert not any(p.is_meta for p in model.parameters())


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_state_dict(tmp_path / "nope.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no .safetensors \(or .sft\) files"):
        load_state_dict(tmp_path / "empty")
    (tmp_path / "weights.npz").write_bytes(b"")
    with pytest.raises(ValueError, match=r"expected a .safetensors \(or .sft\) file"):
        load_state_dict(tmp_path / "weights.npz")


def test_sft_files_load_as_safetensors(tmp_path, reference):
    """`.sft` (flux1-dev.sft, ae.sft as some repositories name them) is safetensors: the same
    tensors, memory-mapped, alone or as a folder's file."""
    sd, expected = reference
    path = tmp_path / "flux1-dev.sft"
    save_file(sd, str(path))
    loaded = load_state_dict(path)
    assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], sd[k]) for k in sd)
    assert mapped_file(loaded["img_in.weight"]) == str(path)
    torch.testing.assert_close(run(Flux.from_state_dict(loaded, axes_dim=PARAMS.axes_dim)), expected, rtol=0, atol=1e-5)
    assert load_state_dict(tmp_path).keys() == sd.keys()  # a folder holding it


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_safetensors_file_names_the_file(tmp_path, reference, damage):
    good = tmp_path / "good.safetensors"
    save_file(reference[0], str(good))
    data = good.read_bytes()
    path = tmp_path / "ae.sft"
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": bytes(range(256)) * 8, "empty": b""}[damage])
    with pytest.raises(CheckpointReadError, match=re.escape(str(path)) + r" \(\d[\d,]* bytes\) is not a readable "
                       r"safetensors file: .*It may be truncated") as error:
        load_state_dict(path)
    assert isinstance(error.value, ValueError) and error.value.__cause__ is None and error.value.__suppress_context__
