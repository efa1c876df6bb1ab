"""The FLUX whole run on small devices: text encoders streamed or in fp8 while caching give the
embeddings of resident ones, sample.py with fp8 and block swap gives the image it gives without
swapping, and sample.py takes its files and memory settings from a training config."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import demo_data
import sample
import training
from config import DEFAULTS
from families.flux import FAMILY as FLUX

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("whole")
    made = demo_data.make_demo(root / "demo")
    from models.flux import Flux, FluxParams

    torch.manual_seed(0)
    deeper = Flux(FluxParams(**{**demo_data.FLUX_TINY, "depth": 4, "depth_single_blocks": 6}))
    save_file({k: v.contiguous() for k, v in deeper.state_dict().items()}, str(root / "deeper.safetensors"))
    deep_text = {"clip_l_path": str(demo_data.make_clip(root / "clip4", layers=4)),
                 "t5_path": str(demo_data.make_t5(root / "t54", layers=4))}  # room to stream two of four layers
    return dict(made, deeper=str(root / "deeper.safetensors"), deep_text=deep_text)


def encoder(files, **changes):
    cfg = {**DEFAULTS, **files["deep_text"], "t5_max_length": 8, "text_encoder_placement": "device", **changes}
    text = FLUX.text_encoder(cfg, None, torch.float32, "cpu")
    swaps = training.place_text_encoders(text.networks(), cfg, "cpu")
    return text, swaps


def test_streamed_text_encoders_give_the_resident_embeddings(files):
    captions = ["a red circle", "a blue square", "", "the red green blue yellow circle square triangle"]
    resident, _ = encoder(files)
    streamed, swaps = encoder(files, text_encoder_placement="stream")
    assert [len(s.groups["layers"].occupant) for s in swaps] == [2, 2]  # two device slots per encoder
    expected, got = resident.encode(captions), streamed.encode(captions)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    assert sum(s.transfers["h2d"] for s in swaps) > 0  # the layers really moved through the slots


def test_fp8_text_encoders_stay_close_and_keep_fp8_files_exact(files):
    import fp8

    captions = ["a red circle", "a green triangle"]
    resident, _ = encoder(files)
    quantized, _ = encoder(files, text_encoder_fp8=True)
    t5 = quantized.networks()["t5"]
    stored = [m for m in t5.modules() if isinstance(m, fp8.Fp8Linear)]
    assert stored and all(m.weight.dtype == torch.float8_e4m3fn for m in stored)
    assert all(not isinstance(b.layer[-1].DenseReluDense.wo, fp8.Fp8Linear) for b in t5.encoder.block)
    a, b = resident.encode(captions)["t5"], quantized.encode(captions)["t5"]
    assert ((a - b).norm() / a.norm()) < 0.05  # e4m3 keeps 3 mantissa bits
    exact = torch.tensor([[0.5, -1.25], [448.0, 0.001953125]])  # fp8 numbers: a released fp8 file, upcast
    weight, scale = fp8.quantize_weight(exact)
    assert float(scale) == 1.0 and torch.equal(weight.float(), exact)


def run_sample(files, out: Path, *extra: str) -> np.ndarray:
    sample.main(["--model", files["deeper"], "--clip_l", files["clip_l_path"], "--t5", files["t5_path"],
                 "--dtype", "fp32", "--device", "cpu", "--t5_max_length", "8",
                 "--model_overrides", json.dumps({"axes_dim": [8, 20, 20]}),
                 "--prompt", "a red circle --w 16 --h 16 --s 3 --d 7", "--out", str(out), *extra])
    return np.asarray(Image.open(out)).astype(int)


def test_sample_with_fp8_and_block_swap_matches_without_swap(files, tmp_path):
    plain = run_sample(files, tmp_path / "plain.png")
    swapped = run_sample(files, tmp_path / "swapped.png", "--blocks_to_swap", "2")
    assert np.array_equal(plain, swapped)  # swapping moves weights, never changes what is computed
    fp8_plain = run_sample(files, tmp_path / "fp8.png", "--fp8_base")
    fp8_swapped = run_sample(files, tmp_path / "fp8_swapped.png", "--fp8_base", "--blocks_to_swap", "2")
    assert np.array_equal(fp8_plain, fp8_swapped)
    assert np.abs(fp8_plain - plain).max() <= 16  # fp8 rounds the base, the image stays the image


def test_sample_takes_files_and_memory_settings_from_a_training_config(files, tmp_path):
    config = tmp_path / "train_config.py"
    config.write_text("".join(f"{k} = {v!r}\n" for k, v in dict(
        model_path=files["deeper"], clip_l_path=files["clip_l_path"], t5_path=files["t5_path"],
        model_overrides={"axes_dim": [8, 20, 20]}, t5_max_length=8, dtype="fp32", device="cpu", blocks_to_swap=2,
        text_encoder_placement="stream", vae_tile_size=0, dataset_dir="not/needed/for/sampling").items()))
    out = tmp_path / "from_config.png"
    sample.main(["--config", str(config), "--prompt", "a red circle --w 16 --h 16 --s 3 --d 7", "--out", str(out)])
    assert np.array_equal(np.asarray(Image.open(out)).astype(int), run_sample(files, tmp_path / "flags.png"))
