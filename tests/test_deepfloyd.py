"""DeepFloyd IF UNets (models/deepfloyd.py) against two independent implementations:

- the original deep-floyd/IF code (model/unet.py, nn.py), vendored unchanged in
  tests/oracles/deepfloyd_if/deepfloyd_if (see the README there);
- diffusers' UNet2DConditionModel, configured as the IF unet/config.json files are.

For each stage a tiny original UNetModel / SuperResUNetModel gets random weights (rounded
to fp16, as the released files hold them); they are written as an original folder
(config.yml + pytorch_model.bin) and, through this project's key mapping, as a diffusers
folder (config.json + safetensors). Our model loaded from either folder must give the
original's and diffusers' outputs on all 6 channels, and the mapping must agree with
diffusers' own converter (scripts/convert_if.py, vendored beside the original code).
"""
import json
from dataclasses import replace
import pickle
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from models.deepfloyd import (
    DIFFUSERS_DEFAULTS,
    IFUNet,
    config_from_diffusers,
    config_from_original,
    diffusers_config,
    diffusers_module_names,
    load_unet,
    module_pairs,
    parse_simple_yaml,
    read_config_yml,
    to_diffusers,
    to_original,
)

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated"),  # the vendored nn.py's gelu_jit
]

ORACLES = Path(__file__).parent / "oracles" / "deepfloyd_if"
DATA = Path(__file__).parent / "data" / "deepfloyd"
TOLERANCE = 1e-5  # fp32, absolute, all 6 output channels

# Stage I on the IF-I-XL template (3 res blocks per level, mult up to 4: diffusers' stage-I
# converter and its default time_embedding_dim assume both); 3 heads of 32 at level 2.
STAGE_I = dict(
    image_size=64, in_channels=3, model_channels=32, out_channels=6, num_res_blocks=3,
    attention_resolutions="32,16,8", channel_mult="1,2,3,4", num_heads=1, num_head_channels=32,
    use_scale_shift_norm=True, resblock_updown=True, encoder_dim=64, encoder_channels=128,
    activation="gelu", att_pool_heads=4, disable_self_attentions=False, precision="16",
)
# Stage II on the IF-II-L template: a list of res blocks, attention only at the two deepest
# levels (so level 1 ends with an upsampling ResBlock and no attention), efficient activation,
# skip scaling, 6 input channels.
STAGE_II = dict(
    image_size=64, in_channels=6, model_channels=32, out_channels=6, num_res_blocks=[1, 2, 1, 2],
    attention_resolutions="16,8", channel_mult="1,2,3,4", num_heads=1, num_head_channels=32,
    use_scale_shift_norm=True, resblock_updown=True, encoder_dim=64, encoder_channels=96,
    activation="gelu", att_pool_heads=8, efficient_activation=True, scale_skip_connection=True,
    disable_self_attentions=False, precision="16",
)
# Stage II whose attention blocks have no self-attention (keys and values from the text only):
# no released UNet does this, but both config formats can say it.
CROSS_ONLY = {**STAGE_II, "disable_self_attentions": "16,8"}
BATCH, TOKENS = 2, 5
IMAGE = (8, 16)  # (H, W): non-square; stage II's low-res image is a quarter of it
AUG = 250  # stage II augmentation timestep (the original takes one aug_level for the batch: 0.25)


def oracle_modules():
    """The vendored original package and diffusers' IF converter script (imported on first use)."""
    if str(ORACLES) not in sys.path:
        sys.path.insert(0, str(ORACLES))
    import convert_if
    from deepfloyd_if.model import unet

    return unet, convert_if


class NoNoise:
    """SuperResUNetModel noises low_res with `low_res_diffusion.q_sample`; our forward leaves
    that to the caller, so the original gets the identity here."""

    @staticmethod
    def q_sample(x, t):
        return x


def yml_text(params: dict) -> str:
    """A config.yml as the released ones are laid out: a `params:` map."""
    lines = ["params:"]
    for key, value in params.items():
        text = json.dumps(value) if isinstance(value, (str, list, bool)) else str(value)
        lines.append(f"  {key}: {text}")
    return "\n".join(lines) + "\n"


def diffusers_recipe(params: dict, convert_if) -> dict:
    """The diffusers config that scripts/convert_if.py builds for these params: its config
    function, plus (stage II) the settings get_super_res_unet adds (REFERENCE 6.2), plus the
    pooling heads, which the converter leaves at diffusers' default of 64."""
    if params["in_channels"] == 3:
        config = convert_if.create_unet_diffusers_config(params)
    else:
        config = convert_if.superres_create_unet_diffusers_config(params)
        factor = 1 / 0.7071
        config.update(
            time_embedding_dim=params["model_channels"] * int(params["channel_mult"].split(",")[-1]),
            encoder_hid_dim=params["encoder_dim"], class_embed_type="timestep", addition_embed_type="text",
            time_embedding_act_fn="gelu", resnet_skip_time_act=True, resnet_out_scale_factor=factor,
            mid_block_scale_factor=factor, only_cross_attention=bool(params["disable_self_attentions"]),
            sample_size=params["image_size"],
        )
    config["addition_embed_type_num_heads"] = params["att_pool_heads"]
    return json.loads(json.dumps(config))  # tuples -> lists, as in a config.json


def random_weights(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Every tensor moved off its initial value (the original zeroes its output convs), then
    rounded to fp16 as the released pytorch_model.bin files store them."""
    g = torch.Generator().manual_seed(seed)
    return {k: (v + 0.05 * torch.randn(v.shape, generator=g)).half() for k, v in model.state_dict().items()}


class Case:
    """One stage: the original model with its weights, both folders, the diffusers oracle."""

    def __init__(self, params: dict, root: Path, seed: int):
        unet, convert_if = oracle_modules()
        from diffusers import UNet2DConditionModel

        self.params = params
        self.super_res = params["in_channels"] == 6
        original_params = {**params, "precision": "32"}
        torch.manual_seed(seed)
        if self.super_res:
            self.original = unet.SuperResUNetModel(low_res_diffusion=NoNoise(), **original_params)
        else:
            self.original = unet.UNetModel(**original_params)
        self.sd = random_weights(self.original, seed)
        self.original.load_state_dict({k: v.float() for k, v in self.sd.items()})
        self.original.eval()
        self.cfg = config_from_original(params)

        self.original_dir = root / "original"
        self.original_dir.mkdir()
        (self.original_dir / "config.yml").write_text(yml_text(params))
        torch.save(self.sd, self.original_dir / "pytorch_model.bin")

        self.recipe = diffusers_recipe(params, convert_if)
        self.diffusers_dir = root / "diffusers" / "unet"
        self.diffusers_dir.mkdir(parents=True)
        (self.diffusers_dir / "config.json").write_text(json.dumps(self.recipe))
        save_file(to_diffusers(self.sd, self.cfg), str(self.diffusers_dir / "diffusion_pytorch_model.safetensors"))
        self.diffusers = UNet2DConditionModel.from_config(self.recipe).eval()
        sd_diffusers = load_file(str(self.diffusers_dir / "diffusion_pytorch_model.safetensors"))
        self.diffusers.load_state_dict({k: v.float() for k, v in sd_diffusers.items()}, strict=True)

    def inputs(self, seed: int = 1) -> dict:
        g = torch.Generator().manual_seed(seed)
        inputs = dict(
            x=torch.randn(BATCH, 3, *IMAGE, generator=g),
            timesteps=torch.tensor([7, 981]),
            text=torch.randn(BATCH, TOKENS, self.params["encoder_dim"], generator=g),
        )
        if self.super_res:
            inputs["low_res"] = torch.randn(BATCH, 3, IMAGE[0] // 4, IMAGE[1] // 4, generator=g)
            inputs["aug_level"] = torch.full((BATCH,), AUG)
        return inputs

    @torch.no_grad()
    def run_original(self, inputs: dict) -> torch.Tensor:
        if self.super_res:
            return self.original(inputs["x"], inputs["timesteps"], low_res=inputs["low_res"],
                                 aug_level=AUG / 1000, text_emb=inputs["text"])
        return self.original(inputs["x"], inputs["timesteps"], inputs["text"])

    @torch.no_grad()
    def run_diffusers(self, inputs: dict, text_mask=None, aug_level=None) -> torch.Tensor:
        sample, class_labels = inputs["x"], None
        if self.super_res:  # the upsampling happens outside diffusers' UNet
            upsampled = F.interpolate(inputs["low_res"], IMAGE, mode="bilinear", align_corners=True)
            sample = torch.cat([sample, upsampled], dim=1)
            class_labels = inputs["aug_level"] if aug_level is None else aug_level
        return self.diffusers(sample, inputs["timesteps"], encoder_hidden_states=inputs["text"],
                              class_labels=class_labels, encoder_attention_mask=text_mask).sample


CASES = {"stage_I": (STAGE_I, 0), "stage_II": (STAGE_II, 1), "cross_only": (CROSS_ONLY, 2)}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    params, seed = CASES[request.param]
    return Case(params, tmp_path_factory.mktemp(request.param), seed)


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape == (BATCH, 6, *IMAGE)
    return (a.float() - b.float()).abs().max().item()


@torch.no_grad()
def test_both_layouts_load_the_same_weights(case):
    from_original = load_unet(case.original_dir)
    from_diffusers = load_unet(case.diffusers_dir.parent)  # the repository root: its unet/ is found
    sd_a, sd_b = from_original.state_dict(), from_diffusers.state_dict()
    assert sd_a.keys() == sd_b.keys() == case.sd.keys()
    for key, tensor in case.sd.items():
        assert sd_a[key].dtype == torch.float32
        assert torch.equal(sd_a[key], tensor.float()) and torch.equal(sd_b[key], tensor.float()), key


@torch.no_grad()
def test_matches_original_code(case):
    inputs = case.inputs()
    expected = case.run_original(inputs)
    for folder in (case.original_dir, case.diffusers_dir):
        assert max_error(load_unet(folder)(**inputs), expected) <= TOLERANCE


@torch.no_grad()
def test_matches_diffusers(case):
    inputs = case.inputs()
    model = load_unet(case.diffusers_dir)
    assert max_error(model(**inputs), case.run_diffusers(inputs)) <= TOLERANCE
    if case.super_res:  # a different augmentation level per sample
        aug = torch.tensor([0, 999])
        assert max_error(model(**{**inputs, "aug_level": aug}), case.run_diffusers(inputs, aug_level=aug)) <= TOLERANCE


@torch.no_grad()
def test_text_mask_matches_diffusers(case):
    """A masked token leaves every cross-attention's keys; the second sample masks them all
    (its image keys remain). The original code has no mask, so only diffusers is compared."""
    inputs = case.inputs()
    mask = torch.tensor([[True, True, True, False, False], [False] * TOKENS])
    model = load_unet(case.original_dir)
    masked = model(**inputs, text_mask=mask)
    assert max_error(masked, model(**inputs)) > 1e-3  # the mask does something
    everything = torch.ones(BATCH, TOKENS, dtype=torch.bool)
    assert torch.allclose(model(**inputs, text_mask=everything), model(**inputs), rtol=0, atol=1e-6)
    if case.params["disable_self_attentions"]:
        # diffusers' added-KV attention pads the mask by the image length even when there are no
        # image keys, and fails. Its -10000 bias on every key of a fully masked sample leaves the
        # softmax as it was: that sample must equal the unmasked one.
        assert torch.allclose(masked[1], model(**inputs)[1], rtol=0, atol=1e-6)
        return
    assert max_error(masked, case.run_diffusers(inputs, text_mask=mask)) <= TOLERANCE


def test_mapping_matches_diffusers_converter(case):
    _, convert_if = oracle_modules()
    if case.super_res:
        theirs = convert_if.superres_convert_ldm_unet_checkpoint(dict(case.sd), case.recipe)
    else:
        theirs = convert_if.convert_ldm_unet_checkpoint(dict(case.sd), case.recipe)
    ours = to_diffusers(case.sd, case.cfg)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    back = to_original(theirs, case.cfg)
    assert all(torch.equal(back[k], v) for k, v in case.sd.items()) and back.keys() == case.sd.keys()


def test_diffusers_config_is_the_converters(case):
    """Our config.json for a network is the one diffusers' converter writes, and it reads
    back to the same network."""
    from diffusers import UNet2DConditionModel

    def full(config: dict) -> dict:
        """Every setting, with the two that may be left to a default resolved as diffusers does."""
        full = {k: v for k, v in UNet2DConditionModel.from_config(config).config.items() if not k.startswith("_")}
        full["time_embedding_dim"] = full["time_embedding_dim"] or 4 * full["block_out_channels"][0]
        if full["mid_block_only_cross_attention"] is None:
            full["mid_block_only_cross_attention"] = full["only_cross_attention"]
        return json.loads(json.dumps(full))

    assert full(diffusers_config(case.cfg)) == full(case.recipe)
    assert config_from_diffusers(diffusers_config(case.cfg)) == replace(case.cfg, precision="32")  # not in config.json
    assert config_from_diffusers(full(case.recipe)) == config_from_diffusers(case.recipe)


def test_stage_two_forward_adds_no_noise():
    """Noising low_res to the augmentation level is the caller's job: two calls agree."""
    torch.manual_seed(0)
    model = IFUNet(config_from_original(STAGE_II)).eval()
    inputs = dict(x=torch.randn(1, 3, *IMAGE), timesteps=torch.tensor([500]), text=torch.randn(1, TOKENS, 64),
                  low_res=torch.randn(1, 3, 2, 4), aug_level=torch.tensor([AUG]))
    with torch.no_grad():
        assert torch.equal(model(**inputs), model(**inputs))
    with pytest.raises(ValueError, match="stage II needs low_res"):
        model(**{**inputs, "low_res": None})
    with pytest.raises(ValueError, match="stage II needs aug_level"):
        model(**{**inputs, "aug_level": None})


def test_precision_and_dtype(case):
    """The config's precision ("16") applies when dtype is None; a dtype wins over it."""
    assert load_unet(case.original_dir, dtype=None).time_embed[0].weight.dtype == torch.float16
    assert load_unet(case.original_dir, dtype=torch.bfloat16).out[2].weight.dtype == torch.bfloat16


# --- released sizes --------------------------------------------------------------------------

RELEASED = {"IF-I-XL-v1.0": 4_304_695_110, "IF-II-L-v1.0": 1_243_277_190}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_parameter_counts(name):
    """Both layouts of each released config build the full network on the meta device, with
    the published count; diffusers agrees on the config.json."""
    from diffusers import UNet2DConditionModel

    original = load_unet(DATA / name, device="meta")
    diffusers_layout = load_unet(DATA / name / "unet", device="meta", dtype=torch.bfloat16)
    assert sum(p.numel() for p in original.parameters()) == RELEASED[name]
    assert original.time_embed[0].weight.device.type == "meta"
    assert diffusers_layout.out[2].weight.dtype == torch.bfloat16
    shapes = {k: v.shape for k, v in original.state_dict().items()}
    assert shapes == {k: v.shape for k, v in diffusers_layout.state_dict().items()}
    config = json.loads((DATA / name / "unet" / "config.json").read_text())
    with torch.device("meta"):
        theirs = UNet2DConditionModel.from_config(config)
    assert sum(p.numel() for p in theirs.parameters()) == RELEASED[name]
    assert {k: v.shape for k, v in theirs.state_dict().items()} == {
        k: v.shape for k, v in to_diffusers(original.state_dict(), original.config).items()
    }


def test_module_pairs_cover_every_parameter():
    """Every parameter of the released networks belongs to exactly one mapped module."""
    for name in RELEASED:
        model = load_unet(DATA / name, device="meta")
        prefixes = {p.original for p in module_pairs(model.config)}
        modules = {k.rsplit(".", 1)[0] for k in model.state_dict()}
        owners = {m: [p for p in prefixes if m == p or m.startswith(p + ".")] for m in modules}
        assert all(len(o) == 1 for o in owners.values()), {m: o for m, o in owners.items() if len(o) != 1}


def test_diffusers_module_names():
    """IF-II-L: res blocks [2, 2, 3, 5, 5]; input block 13 is level 3's third, output block 11
    ends level 3 (res, attention, upsampling res), output blocks 12-15 are level 2's."""
    cfg = load_unet(DATA / "IF-II-L-v1.0", device="meta").config
    assert diffusers_module_names("input_blocks.13.1.qkv", cfg) == [
        f"down_blocks.3.attentions.2.{n}" for n in ("to_q", "to_k", "to_v")]
    assert diffusers_module_names("input_blocks.16.0.emb_layers.1", cfg) == ["down_blocks.3.downsamplers.0.time_emb_proj"]
    assert diffusers_module_names("output_blocks.3.1.encoder_kv", cfg) == [
        "up_blocks.0.attentions.3.add_k_proj", "up_blocks.0.attentions.3.add_v_proj"]
    assert diffusers_module_names("output_blocks.11.2.emb_layers.1", cfg) == ["up_blocks.1.upsamplers.0.time_emb_proj"]
    assert diffusers_module_names("output_blocks.12.0.skip_connection", cfg) == ["up_blocks.2.resnets.0.conv_shortcut"]
    assert diffusers_module_names("output_blocks.15.1.out_layers.3", cfg) == ["up_blocks.2.upsamplers.0.conv2"]
    assert diffusers_module_names("middle_block.1.proj_out", cfg) == ["mid_block.attentions.0.to_out.0"]
    assert diffusers_module_names("aug_proj.2", cfg) == ["class_embedding.linear_2"]


# --- config files -----------------------------------------------------------------------------


def test_simple_yaml_reader_matches_pyyaml():
    yaml = pytest.importorskip("yaml")
    texts = [p.read_text() for p in DATA.glob("*/config.yml")]
    texts.append(yml_text(STAGE_II) + "# trailing comment\nother:\n  nested:\n    a: 1.5\n  flag: off\n  none: ~\n")
    texts.append("params:\n  num_res_blocks:\n  - 1\n  - 2\n  name: 'gelu'  # quoted\n  mult: [1, 2]\n")
    for text in texts:
        assert parse_simple_yaml(text) == yaml.safe_load(text)
    with pytest.raises(ValueError, match="YAML feature not supported"):
        parse_simple_yaml("params:\n  a: &anchor 1\n")


def test_config_yml_without_pyyaml(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "yaml", None)  # `import yaml` raises ImportError
    (tmp_path / "config.yml").write_text((DATA / "IF-II-L-v1.0" / "config.yml").read_text())
    assert read_config_yml(tmp_path / "config.yml")["params"]["num_res_blocks"] == [2, 2, 3, 5, 5]
    assert sum(p.numel() for p in load_unet(tmp_path, device="meta").parameters()) == RELEASED["IF-II-L-v1.0"]


def test_diffusers_defaults_are_diffusers():
    import inspect

    from diffusers import UNet2DConditionModel

    signature = inspect.signature(UNet2DConditionModel.__init__).parameters
    assert {k: signature[k].default for k in DIFFUSERS_DEFAULTS} == DIFFUSERS_DEFAULTS


# --- errors -----------------------------------------------------------------------------------


def test_folder_with_neither_layout(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="neither layout of a DeepFloyd IF UNet"):
        load_unet(tmp_path)
    with pytest.raises(ValueError, match="is a file: pass the folder"):
        load_unet(tmp_path / "model.safetensors")
    (tmp_path / "config.yml").write_text(yml_text(STAGE_I))
    with pytest.raises(FileNotFoundError, match="has a config but no weights"):
        load_unet(tmp_path)
    assert load_unet(tmp_path, device="meta").input_blocks[0][0].weight.is_meta


class Payload:
    """Any object beyond tensors and plain containers: unpickling it could run code."""


def test_pickle_goes_through_weights_only(tmp_path):
    (tmp_path / "config.yml").write_text(yml_text(STAGE_I))
    torch.save({"input_blocks.0.0.weight": torch.zeros(1), "payload": Payload()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_unet(tmp_path)


def test_wrong_family(tmp_path):
    flux_keys = {"double_blocks.0.img_attn.qkv.weight": torch.zeros(3, 1), "img_in.weight": torch.zeros(1, 1)}
    original = tmp_path / "original"
    original.mkdir()
    (original / "config.yml").write_text(yml_text(STAGE_I))
    torch.save(flux_keys, original / "pytorch_model.bin")
    with pytest.raises(ValueError, match="expected a DeepFloyd IF UNet, but this file looks like a FLUX.1"):
        load_unet(original)
    unet = tmp_path / "diffusers"
    unet.mkdir()
    (unet / "config.json").write_text(json.dumps(diffusers_config(config_from_original(STAGE_I))))
    save_file(flux_keys, str(unet / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ValueError, match="expected a DeepFloyd IF UNet, but this file looks like a FLUX.1"):
        load_unet(unet)
    (unet / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))  # SD 1.x defaults
    with pytest.raises(ValueError, match="config.json does not describe a DeepFloyd IF UNet"):
        load_unet(unet, device="meta")


def test_diffusers_keys_must_match_the_config():
    cfg = config_from_original(STAGE_I)
    with torch.device("meta"):
        sd = to_diffusers(IFUNet(cfg).state_dict(), cfg)
    sd.pop("mid_block.attentions.0.to_k.weight")
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"1 missing, 1 unexpected\)\n  missing: \['mid_block.attentions.0.to_k"):
        to_original(sd, cfg)
    with pytest.raises(ValueError, match="middle_block.0.in_layers.1.weight is not a DeepFloyd IF UNet parameter"):
        to_diffusers({"middle_block.0.in_layers.1.weight": torch.zeros(1)}, cfg)
