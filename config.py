"""Training configuration: every setting with its default, and the checks that run
before any model loads.

A config file is plain Python assignments that differ from DEFAULTS (see configs/).
`python train.py configs/x.py --key=value` overrides from the command line.
Unknown keys, wrong types and impossible combinations are errors that say what to do.
"""
import ast
import difflib
import math
from pathlib import Path

import torch

# fmt: off
DEFAULTS = dict(
    # --- model files (see README "Where the files come from") ---
    model_family="auto",          # "auto" (read from model_path's keys), or one of families.names(): "flux"
    model_path="",                # the denoiser: flux1-dev.safetensors, flux1-schnell.safetensors (a file, folder or index);
                                  # DeepFloyd IF: the model folder (IF-I-XL-v1.0: config.yml + weights, or its unet/)
    ae_path="",                   # ae.safetensors; "" trains on pixels directly (the demo)
    clip_l_path="",               # clip_l.safetensors or a CLIPTextModel folder
    t5_path="",                   # t5xxl_fp16.safetensors / t5xxl_fp8_e4m3fn.safetensors or a folder (IF: text_encoder/)
    clip_tokenizer="",            # folder or tokenizer.json; "" looks next to clip_l_path
    t5_tokenizer="",              # folder, tokenizer.json or spiece.model; "" looks next to t5_path
    model_overrides={},           # network hyper-parameters to override (tiny test models: FLUX axes_dim)
    allow_pickle=False,           # read .ckpt/.pt files (with torch.load(weights_only=True))
    # --- data ---
    dataset_dir="",               # images with same-name .txt captions, or metadata.jsonl
    caption_ext=".txt",
    instance_prompt="",           # trigger word prepended to every caption
    caption_dropout_rate=0.0,     # train this fraction of samples on the empty caption (for CFG at sampling)
    repeats=1,                    # each image counts this many times per epoch
    resolution=1024,              # training size: a square, or with buckets the area resolution x resolution
    crop="center",                # "center" or "random" (random crops are seeded per image and repeat)
    datasets=[],                  # dataset sections, each a dict of SECTION_KEYS (below) over these defaults:
                                  # [{"dataset_dir": "data/me", "repeats": 5}, {"dataset_dir": "data/reg", "resolution": 512}]
    # aspect-ratio buckets (buckets.py; kohya's keys)
    enable_bucket=False,          # each image in the bucket of nearest aspect ratio at the training area
    min_bucket_reso=256,          # shortest bucket side in pixels
    max_bucket_reso=1024,         # longest bucket side in pixels
    bucket_reso_steps=0,          # bucket sides are multiples of this; 0: the family's resolution multiple
    bucket_no_upscale=False,      # never enlarge an image: small images get a bucket of their own size
    flip_aug=False,               # each sample mirrored left-right with probability 1/2 (both versions cached)
    # captions (captions.py; kohya's keys): changes per epoch are cached as caption variants
    caption_prefix="",            # put before every caption (after the instance prompt)
    caption_suffix="",            # put after every caption
    caption_separator=",",        # between tags
    shuffle_caption=False,        # shuffle the tags after the first keep_tokens, per epoch
    keep_tokens=0,                # tags kept in front
    keep_tokens_separator="",     # e.g. "|||": everything before it is kept in place
    caption_tag_dropout_rate=0.0, # drop each unkept tag with this probability, per epoch
    enable_wildcard=False,        # {a|b|c} choices and multi-line captions: one drawn per epoch
    # masked loss: masked pixels add nothing to the loss (kohya's keys)
    masked_loss=False,            # loss mask from mask_dir (white = trained, black = ignored)
    alpha_mask=False,             # loss mask from each image's alpha channel (transparent = ignored)
    mask_dir="",                  # masks named like the images (kohya's conditioning_data_dir)
    cache_dir="",                 # "" -> <dataset_dir>/.cache
    recache=False,                # rebuild latent and text caches
    hash_images=False,            # key image cache entries by content hash instead of size + mtime
    on_bad_image="skip",          # "skip" (listed at the end) or "stop"
    t5_max_length=0,              # 0 -> 512 for dev, 256 for schnell
    apply_t5_attn_mask=False,     # mask T5 padding in the encoder and in attention (DeepFloyd IF: its T5 always
                                  # masks; this masks the UNet's cross-attention, where the released models see all 77)
    validation_count=0,           # hold out this many images for validation loss (0 = off)
    vae_batch_size=1,             # images per autoencoder pass while caching latents
    text_batch_size=8,            # captions per text-encoder pass while caching
    text_encoder_placement="device",  # while caching: "device", "stream" (layers through 2 device slots), "cpu"
    text_encoder_fp8=False,       # text encoders' layer weights in fp8 while caching (a released fp8 T5 stays fp8)
    vae_tile_size=-1,             # sample decode: -1 tiles when the whole decode would raise the run's peak,
                                  # 0 never, N tiles of N latent pixels
    # --- run ---
    output_dir="runs",
    run_name="flux_lora",
    seed=42,
    device="auto",                # "auto" (cuda if available), "cuda", "cpu"
    dtype="bf16",                 # weights and compute: "bf16", "fp32", "fp16" where the family allows it
    max_train_steps=1000,
    max_train_epochs=0,           # > 0: train this many epochs (max_train_steps follows from the data)
    batch_size=1,
    gradient_accumulation_steps=1,
    gradient_checkpointing=True,
    kernels="auto",               # fused element-wise ops: "auto", "torch", "triton"
    # --- optimizer and schedule ---
    optimizer="adamw",            # "adamw", "adafactor" (factored second moment) or "adamw8bit" (8-bit moments)
    learning_rate=1e-4,
    weight_decay=0.01,
    betas=(0.9, 0.999),
    eps=1e-8,
    max_grad_norm=1.0,            # global-norm clipping; 0 disables (must be 0 with fused_backward)
    max_grad_norm_per_param=0.0,  # per-parameter clipping, the one kind fused_backward allows; 0 disables
    lr_scheduler="constant_with_warmup",  # constant, constant_with_warmup, cosine_with_warmup, polynomial, linear
    lr_warmup_steps=0,            # steps, or a fraction of max_train_steps when below 1 (0.1 = 10%)
    lr_end_ratio=0.0,             # polynomial/cosine end LR as a fraction of learning_rate
    lr_power=1.0,                 # polynomial power
    ema_decay=0.0,                # 0 disables EMA of the trainable weights
    ema_every=1,
    # --- flow matching (losses.py) ---
    timestep_sampling="shift",    # uniform, sigmoid, shift, flux_shift, logit_normal, mode
    sigmoid_scale=1.0,
    discrete_flow_shift=3.1582,
    logit_mean=0.0,
    logit_std=1.0,
    mode_scale=1.29,
    model_prediction_type="raw",  # raw or additive
    loss_type="l2",               # l2, huber, smooth_l1
    huber_c=0.1,
    huber_schedule="constant",    # constant, exponential or snr
    guidance_scale=1.0,           # embedded guidance fed during training (dev)
    # --- what to train (lora.py) ---
    train_mode="lora",            # "lora" or "full" (full fine-tuning)
    network_dim=16,               # LoRA rank
    network_alpha=0.0,            # scale = alpha / rank; 0 means alpha = rank (scale 1), recorded as such
    network_dropout=0.0,
    group_ranks={},               # img_attn, txt_attn, img_mlp, txt_mlp, img_mod, txt_mod, single, single_mod -> rank (0 = none)
    train_double_blocks="all",    # "all", "none" or "0,1,4-7"
    train_single_blocks="all",
    lora_embedders=False,         # also LoRA on img_in, time_in, vector_in, guidance_in, txt_in
    targets="",                   # a layer-targeting preset instead of the family's selection keys: "attention_only",
                                  # "context_blocks", "late_blocks", "early_blocks", "no_embedders", "no_last_blocks",
                                  # "mlp_only", "image_blocks", "no_modulation", "blocks", "all" (the list, with each
                                  # one's layers: python lora.py presets CONFIG); train_mode="full" trains their weights
    rank_dropout=0.0,             # kohya's rank dropout: each rank feature dropped per sample while training
    module_dropout=0.0,           # kohya's module dropout: a whole LoRA module skipped for a step while training
    use_dora=False,               # DoRA: a trained magnitude per output row (the file's dora_scale)
    split_qkv=False,              # one LoRA per q / k / v (and MLP) slice of fused weights (FLUX, SD3), saved fused
    loraplus_lr_ratio=0.0,        # LoRA+: the up matrices learn this many times faster (16 in the paper); 0 is off
    text_encoder_lr={},           # text-encoder LoRA: encoder -> learning rate, e.g. {"clip_l": 5e-5, "t5": 2e-5};
                                  # those encoders then encode captions during training instead of from the cache
    network_weights="",           # continue from this LoRA file (kohya's network_weights; any format the family reads)
    save_dtype="bf16",            # dtype of saved LoRA / model files
    lora_format="kohya",          # LoRA file keys: "kohya" (lora_unet_..., ComfyUI), or "diffusers" (transformer.<module>.lora_A/B:
                                  # diffusers' load_lora_weights and ComfyUI; for SD3, whose kohya names diffusers cannot read)
    lora_dtype="fp32",            # LoRA weights while training: "fp32" or "bf16" (updates stochastically rounded:
                                  # needs optimizer="adafactor" or "adamw8bit", or fused_backward)
    # --- checkpoints, samples, validation ---
    save_every=250,               # steps between LoRA files + resumable state
    save_every_n_epochs=0,        # also save at the end of every N-th epoch
    keep_last=3,                  # resumable states kept
    resume="",                    # "" (fresh), "latest" (error if none), "auto" (latest if any), or a state folder
    overwrite=False,              # a fresh run into a folder holding a run moves the old run aside (else: an error)
    sample_every=250,             # 0 disables
    sample_every_n_epochs=0,      # also sample at the end of every N-th epoch
    sample_at_start=True,
    sample_prompts="",            # file in kohya syntax (--n --w --h --d --l --g --s), or "" for none
    sample_sizes="",              # "64,96,64x96" (W or WxH): every sample prompt at each size; "" = their own
    sample_steps=0,               # 0: the family's default (FLUX dev 28, schnell 4)
    sample_guidance=3.5,          # default embedded guidance for samples (dev)
    validate_every=100,           # 0 disables
    log_every=1,
    log_block_grad_norms=False,   # each step's gradient norm per block in metrics.jsonl (tools/compare_targets.py)
    tensorboard=True,             # also write TensorBoard events (<run>/tensorboard) when the package is installed
    # --- SD3 / SD3.5 only (families/sd3.py) ---
    sd3_variant="",               # "" reads it from model_path (shapes; "turbo" in the file name), or sd3-medium,
                                  # sd3.5-medium, sd3.5-large, sd3.5-large-turbo (plans without the file; sampling defaults)
    clip_g_path="",               # clip_g.safetensors or a CLIP-G folder; "" (and clip_l_path, t5_path "") reads the
                                  # text_encoders.* sections of an all-in-one model_path (sd3_medium_incl_clips_t5xxlfp16)
    clip_g_tokenizer="",          # folder or tokenizer.json; "" looks next to clip_g_path (tokenizer_2/, tokenizer/)
    weighting_scheme="none",      # loss weight per sample: none, sigma_sqrt, cosmap (kohya compute_loss_weighting_for_sd3)
    training_shift=1.0,           # kohya --training_shift: sigma <- shift * sigma / (1 + (shift - 1) sigma) after the draw
    discrete_timesteps=True,      # sigma = floor(1000 sigma) / 1000, as kohya's SD3
    clip_l_dropout_rate=0.0,      # per-sample, per-encoder caption dropout (that encoder's part becomes zeros; kohya)
    clip_g_dropout_rate=0.0,
    t5_dropout_rate=0.0,
    pos_emb_random_crop_rate=0.0, # multi-resolution (SD3.5 Medium, kohya): a random pos_embed window this often
    enable_scaled_pos_embed=False,  # multi-resolution (SD3.5 Medium, kohya): a scaled sin-cos table for the resolution
    train_joint_blocks="all",     # which joint blocks train (LoRA targets; full fine-tuning freezes the others):
                                  # "all", "none", "30-37" (detail), "12-24" (composition), "0-33" (last blocks frozen)
    freeze_embedders=False,       # full fine-tuning: x/t/y/context embedders stay as they are (LoRA leaves them anyway)
    sample_sampler="",            # "" the family's: SD3 the variant's (dpmpp_2m; euler for Large Turbo), SDXL euler;
                                  # SD3 euler, dpmpp_2m; SDXL also euler_ancestral, ddim
    sample_shift=0.0,             # sampling schedule shift; 0: 3.0, the released models'
    sample_cfg=0.0,               # CFG scale against the negative prompt (--n, default ""); 0: the family's (SD3.5 Large
                                  # 4.5, Medium 5, Large Turbo 1; SDXL 5; IF 7 stage I, 4 stage II); a prompt's --l overrides
    sample_apg=False,             # adaptive projected guidance instead of plain CFG (seed 004's APG node)
    apg_eta=0.0,                  # APG: weight of the update parallel to the prediction
    apg_norm_threshold=15.0,      # APG: the update's L2 norm is clipped to this (0: no clipping)
    apg_momentum=-0.5,            # APG: running average of the update (negative: the paper's reverse momentum)
    sample_slg_scale=0.0,         # skip-layer guidance (SD3.5 Medium's reference: 2.5); 0 turns it off
    slg_layers=(7, 8, 9),         # joint blocks left out of the skip pass
    slg_start=0.01,               # SLG acts for steps i with start * steps < i < end * steps
    slg_end=0.2,

    # --- SDXL only (families/sdxl.py) ---
    # clip_g_path (above, SD3) names SDXL's OpenCLIP bigG too; "" reads it (and CLIP-L when clip_l_path is "")
    # from model_path's conditioner
    max_token_length=75,          # caption tokens: 75, 150 or 225 (kohya's; one 77-token CLIP window per 75)
    no_half_vae=True,             # the VAE in fp32 (kohya's --no_half_vae): the SDXL VAE overflows in fp16; False: the run's dtype
    v_parameterization=False,     # v-prediction instead of epsilon (kohya's name)
    zero_terminal_snr=False,      # rescale the betas so the last step is pure noise (Lin et al. 2024)
    min_timestep=0,               # t is drawn from [min_timestep, max_timestep) of the 1000 DDPM steps
    max_timestep=1000,
    min_snr_gamma=0.0,            # min-SNR weighting min(SNR, gamma) / SNR (v: / (SNR + 1)); 0 off, 5 is the paper's
    debiased_estimation_loss=False,  # weight 1 / sqrt(SNR) (v: 1 / (SNR + 1))
    scale_v_pred_loss_like_noise_pred=False,
    v_pred_like_loss=0.0,
    noise_offset=0.0,             # eps += noise_offset * N(0, 1) per sample and channel (0.1 in seed 001's lean recipe)
    noise_offset_random_strength=False,
    adaptive_noise_scale=0.0,     # noise_offset += adaptive_noise_scale * |latent mean|; 0 off
    multires_noise_iterations=0,  # pyramid noise levels; 0 off (6-10 typical)
    multires_noise_discount=0.3,
    ip_noise_gamma=0.0,           # input-perturbation noise on x_t only; 0 off (0.1 typical)
    ip_noise_gamma_random_strength=False,
    conv_dim=0,                   # LoCon: LoRA rank on the 3x3 convolutions too (0: none), as kohya's conv_dim
    conv_alpha=0.0,               # their alpha; 0 means alpha = conv_dim
    block_dims="",                # kohya's 23 ranks "r0,r1,...": base, 9 input, 3 middle, 9 output blocks, out
    block_alphas="",              # 23 alphas in the same order ("" -> network_alpha)
    conv_block_dims="",           # 23 LoCon ranks ("" -> conv_dim)
    conv_block_alphas="",
    down_lr_weight="",            # learning-rate factors of the 9 input blocks, or cosine/sine/linear/reverse_linear/zeros[+base]
    mid_lr_weight="",             # 3 factors for the middle block
    up_lr_weight="",              # 9 factors for the output blocks
    block_lr_zero_threshold=0.0,  # factors at or below it become 0 (those blocks get no LoRA)
    sample_schedule="leading",    # leading (SDXL's), trailing (zero-terminal-SNR models), linspace, karras

    # --- DeepFloyd IF only (families/deepfloyd.py) ---
    # IF also reads SDXL's DDPM keys above (min_timestep ... ip_noise_gamma_random_strength; not v_parameterization or
    # zero_terminal_snr: IF predicts epsilon with a learned variance), apply_t5_attn_mask and sample_cfg
    if_unconditional_embedding="",  # IF's resources/zero_t5-v1_1-xxl_vector.npy: the "" caption's T5 states; "" encodes ""
    if_clean_captions=True,       # IF's caption clean-up (URLs, markup, symbols) before T5, as the original does
    if_freeze_variance=False,     # False: the variance channels train with the hybrid VLB term, as the original;
                                  # True: epsilon only (the variance output drifts only through shared layers), and
                                  # samples use the fixed-small variance (diffusers' IF LoRA docs, SimpleTuner's advice)
    if_aug_levels=(0.0, 1.0),     # stage II: low-res noise-augmentation level drawn uniformly per sample (the original's)
    if_sample_aug_level=0.25,     # stage II samples and validation: the low-res image's augmentation level
    if_respacing="",              # sampler: "" -> "150" stage I, "smart50" stage II; also "smart100", "fast27", "ddim50", "50"
    if_dynamic_threshold=0.0,     # x0 clip ratio (percentile 0.95): 0 -> 1.5 stage I, 1.0 stage II
    if_sample_low_res="",         # stage II samples in training: the image they upscale; "" -> the dataset's first image

    # --- memory (blockswap.py, optim.py, fp8.py; `python train.py CONFIG --plan` shows the effect) ---
    blocks_to_swap=0,             # kohya's count for FLUX: n -> n//2 double + (n - n//2)*2 single blocks live in host memory;
                                  # SDXL: n blocks, the deepest level's transformer blocks first (families/sdxl.py);
                                  # DeepFloyd IF: n blocks of each group, down and up (families/deepfloyd.py)
    double_blocks_to_swap=-1,     # finer control; -1 derives both from blocks_to_swap
    single_blocks_to_swap=-1,
    swap_mode="exchange",         # "exchange" (weights move both ways) or "h2d_only" (frozen base, host copy is the master)
    pin_memory=True,              # pinned host memory for swapped blocks (faster copies; some systems prefer False)
    swap_ring=0,                  # N >= 2: every block of every group streams through one ring of N device slots
                                  # sized for the largest block (instead of blocks_to_swap); 0: off
    swap_staging=False,           # h2d_only: swapped weights read where loading left them (memory-mapped file or
                                  # quantized fp8), pageable, through 2 pinned staging buffers; no pinned host copy
    chunk_feedforward=False,      # token-wise parts of a block (FLUX: MLPs, linear1, linear2) run in token chunks,
                                  # each recomputed in backward: one chunk's hidden activations at a time
    feedforward_chunk=1024,       # tokens per chunk
    fused_backward=False,         # optimizer step inside backward, one parameter at a time: no full set of gradients
    stochastic_rounding=True,     # bf16 trainable weights get stochastically rounded updates (fused step, Adafactor)
    fp8_base=False,               # frozen Linear weights stored as float8_e4m3fn, upcast inside the matmul
    fp8_per_row=False,            # one fp8 scale per output row instead of per tensor
    fp8_base_cache="",            # a folder: the fp8 block weights are written there once (12 GB for FLUX.1) and
                                  # read memory-mapped afterwards (page cache, not process memory); "" quantizes each run
    offload_activations=False,    # checkpointed block inputs go to host memory
    # --- several GPUs (distributed.py; launch with torchrun --nproc_per_node N train.py CONFIG) ---
    distributed="auto",           # "auto": data parallel for LoRA, FSDP2 for full fine-tuning; "ddp": the whole model
                                  # on every GPU (full fine-tuning of a model that fits); "fsdp": shard (full only)
    plan_gpus=1,                  # --plan: per-GPU figures for this many GPUs (training counts what torchrun starts)
)
# fmt: on


def _choices() -> dict[str, tuple]:
    """The allowed values of each choice key, read from the code that implements them."""
    import distributed
    import lora
    import losses
    import optim

    return dict(
        crop=("center", "random"),
        on_bad_image=("skip", "stop"),
        device=("auto", "cuda", "cpu"),
        dtype=tuple(DTYPES),
        kernels=("auto", "torch", "triton"),
        optimizer=optim.OPTIMIZERS,
        lr_scheduler=optim.SCHEDULERS,
        timestep_sampling=losses.TIMESTEP_SAMPLINGS,
        model_prediction_type=losses.PREDICTION_TYPES,
        loss_type=losses.LOSS_TYPES,
        huber_schedule=losses.HUBER_SCHEDULES,
        train_mode=("lora", "full"),
        save_dtype=("bf16", "fp16", "fp32"),
        lora_dtype=("fp32", "bf16"),
        swap_mode=("exchange", "h2d_only"),
        lora_format=lora.LORA_FORMATS,
        weighting_scheme=losses.WEIGHTING_SCHEMES,
        text_encoder_placement=("device", "stream", "cpu"),
        distributed=distributed.MODES,
    )


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}  # the one name -> dtype table
PATH_KEYS = ("model_path", "ae_path", "clip_l_path", "clip_g_path", "t5_path", "dataset_dir")
ALIASES = {"flux_path": "model_path",  # old name -> key (configs written before the family seam)
           "conditioning_data_dir": "mask_dir"}  # kohya's name
# What a dataset section may set (the rest comes from the top level), and kohya's names for some.
SECTION_KEYS = ("dataset_dir", "repeats", "resolution", "batch_size", "caption_ext", "crop", "enable_bucket",
                "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale", "flip_aug",
                "instance_prompt", "caption_prefix", "caption_suffix", "caption_separator", "shuffle_caption",
                "keep_tokens", "keep_tokens_separator", "caption_tag_dropout_rate", "enable_wildcard", "alpha_mask",
                "mask_dir")
SECTION_ALIASES = {"image_dir": "dataset_dir", "num_repeats": "repeats", "class_tokens": "instance_prompt",
                   "train_batch_size": "batch_size", "conditioning_data_dir": "mask_dir"}


class ConfigError(ValueError):
    pass


def load_config(config_path: str | None, overrides: list[str] = (), check_files: bool = True) -> dict:
    """DEFAULTS, then the config file's assignments, then --key=value overrides; validated.
    check_files=False (the memory plan) skips the checks that model and data files exist."""
    cfg = dict(DEFAULTS)
    given = read_config_file(config_path) if config_path else {}
    for arg in overrides:
        key, value = parse_override(arg)
        given[key] = value
    cfg.update(given)
    validate(cfg, check_files=check_files, given=set(given))
    return cfg


def read_config_file(path: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    namespace: dict = {"__file__": str(path)}
    exec(compile(path.read_text(), str(path), "exec"), namespace)
    values = {k: v for k, v in namespace.items() if not k.startswith("_") and not callable(v) and not _is_module(v)}
    return {ALIASES.get(k, k): v for k, v in values.items()}


def _is_module(value) -> bool:
    return type(value).__name__ == "module"


def parse_override(arg: str) -> tuple[str, object]:
    if not arg.startswith("--") or "=" not in arg:
        raise ConfigError(f"overrides look like --key=value, got {arg!r}")
    key, text = arg[2:].split("=", 1)
    key = ALIASES.get(key, key)
    check_known_key(key)
    default = DEFAULTS[key]
    if isinstance(default, str):
        return key, text
    try:
        return key, ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ConfigError(f"--{key}={text}: expected a {type(default).__name__} literal") from None


def check_known_key(key: str) -> None:
    if key not in DEFAULTS:
        close = difflib.get_close_matches(key, DEFAULTS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown config key {key!r}.{hint} All keys and defaults are in config.py.")


def validate(cfg: dict, check_files: bool = True, given: set[str] | None = None) -> None:
    """Everything that can be checked without loading a model. Resolves model_family="auto"
    from the model file's keys (its header: no weight is read), then gives the keys the config
    does not set (`given`: the keys the file and command line set) the family's own defaults."""
    choices = _choices()
    for key, value in cfg.items():
        check_known_key(key)
        check_type(key, value, DEFAULTS[key])
        if key in choices and value not in choices[key]:
            raise ConfigError(f"{key}={value!r}: choose one of {', '.join(map(repr, choices[key]))}")
    for key in ("max_train_steps", "batch_size", "gradient_accumulation_steps", "repeats", "resolution", "ema_every",
                "vae_batch_size", "text_batch_size", "plan_gpus"):
        if cfg[key] < 1:
            raise ConfigError(f"{key} must be at least 1, got {cfg[key]}")
    if cfg["train_mode"] == "lora" and cfg["network_dim"] < 1:
        raise ConfigError("network_dim must be at least 1 for LoRA training")
    if not 0 <= cfg["caption_dropout_rate"] < 1:
        raise ConfigError(f"caption_dropout_rate must be in [0, 1), got {cfg['caption_dropout_rate']}")
    if not 0 <= cfg["ema_decay"] < 1:
        raise ConfigError(f"ema_decay must be in [0, 1), got {cfg['ema_decay']}")
    if not math.isfinite(cfg["learning_rate"]) or cfg["learning_rate"] <= 0:
        raise ConfigError(f"learning_rate must be a positive number, got {cfg['learning_rate']}")
    check_optimizer_settings(cfg)
    check_training_settings(cfg)
    check_memory_settings(cfg)
    check_sample_sizes(cfg["sample_sizes"])
    family = resolve_family(cfg, check_files)
    apply_family_defaults(cfg, family, given)
    check_family_keys(cfg, family)
    for section in sections(cfg):
        check_data_settings(section, family)
    family.check_config(cfg)
    check_lora_features(cfg, family)
    if check_files:
        check_paths(cfg, family)


def resolve_family(cfg: dict, check_files: bool):
    """The family object; model_family="auto" becomes the detected family's name in cfg."""
    import families

    if cfg["model_family"] != "auto" and cfg["model_family"] not in families.names():
        raise ConfigError(f"model_family={cfg['model_family']!r}: choose 'auto' or one of {families.names()}")
    if check_files and cfg["model_path"] and not Path(cfg["model_path"]).exists():
        raise ConfigError(f"model_path: file or folder not found: {cfg['model_path']}")
    try:
        resolved = families.resolve(cfg["model_family"], cfg["model_path"], cfg["allow_pickle"])
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if cfg["model_family"] == "auto" and cfg["model_path"] and Path(cfg["model_path"]).exists():
        print(resolved.note)
    cfg["model_family"] = resolved.family.name
    return resolved.family


def apply_family_defaults(cfg: dict, family, given: set[str] | None = None) -> None:
    """Family.config_defaults for the keys the config leaves unset. Without `given` (a config
    assembled in code) a key still at its DEFAULTS value counts as unset."""
    for key, value in family.config_defaults().items():
        unset = key not in given if given is not None else cfg[key] == DEFAULTS[key]
        if unset:
            cfg[key] = value


def check_family_keys(cfg: dict, family) -> None:
    """A key of another family's section set to a non-default value would be ignored: refuse it."""
    import families

    others = {k for f in families.FAMILIES.values() for k in f.config_keys} - set(family.config_keys)
    ignored = sorted(k for k in others if cfg[k] != DEFAULTS[k])
    if ignored:
        raise ConfigError(f"{', '.join(ignored)}: not used by {family.title} (model_family={family.name!r}); "
                          "remove them from the config")


def check_lora_features(cfg: dict, family) -> None:
    """What the family must offer for the LoRA settings: presets, text encoders to train."""
    import families
    import lora

    if cfg["targets"] and type(family).lora_layers is families.Family.lora_layers:
        raise ConfigError(f"targets={cfg['targets']!r}: {family.title} has no layer-targeting presets; leave targets "
                          "empty and choose layers with its selection keys")
    if cfg["split_qkv"] and not family.split_qkv_layers:
        raise ConfigError(f"split_qkv: {family.title} has no fused q/k/v weights this trainer splits (FLUX's and "
                          "SD3's); remove split_qkv")
    if cfg["lora_format"] == "diffusers" and type(family).lora_to_diffusers is families.Family.lora_to_diffusers:
        raise ConfigError(f"lora_format='diffusers': {family.title} LoRA files are written in the kohya format only; "
                          "set lora_format='kohya'")
    if cfg["targets"] and cfg["targets"] not in lora.presets(family):
        raise ConfigError(f"targets={cfg['targets']!r}: not a preset of {family.title}; choose one of "
                          f"{', '.join(map(repr, lora.presets(family)))}")
    encoders = family.text_encoder_loras()
    unknown = sorted(set(cfg["text_encoder_lr"]) - set(encoders))
    if unknown:
        raise ConfigError(f"text_encoder_lr: {family.title} has no text encoder {unknown} to train; "
                          f"{'choose among ' + repr(sorted(encoders)) if encoders else 'it trains none'}")
    if cfg["text_encoder_lr"] and cfg["text_encoder_placement"] != "device":
        raise ConfigError("text_encoder_lr: a text encoder that trains stays on the device through training; set "
                          "text_encoder_placement='device'")


def check_paths(cfg: dict, family) -> None:
    """The model, data and prompt files are named and exist (and triton, when asked for)."""
    from models.layers import triton_installed

    if cfg["kernels"] == "triton" and not triton_installed():
        raise ConfigError("kernels='triton' needs the triton package (pip install triton); use 'auto' or 'torch'")
    if not cfg["model_path"]:
        raise ConfigError(f"model_path is empty: set it to the {family.title} checkpoint")
    if not cfg["dataset_dir"] and not cfg["datasets"]:
        raise ConfigError("dataset_dir is empty: set it to a folder of images with .txt captions (or list "
                          "dataset sections in datasets)")
    for key in PATH_KEYS + ("sample_prompts", "mask_dir", "network_weights"):
        if cfg[key] and not Path(cfg[key]).exists():
            raise ConfigError(f"{key}: file or folder not found: {cfg[key]}")
    for i, section in enumerate(sections(cfg) if cfg["datasets"] else []):
        for key in ("dataset_dir", "mask_dir"):
            if section[key] and not Path(section[key]).exists():
                raise ConfigError(f"datasets[{i}] {key}: folder not found: {section[key]}")
    missing = [key for key in family.required_paths if not cfg[key]]
    if missing:
        raise ConfigError(f"{' and '.join(missing)} empty: {family.title} needs them (see README, where the files "
                          "come from)")


def check_sample_sizes(sizes: str) -> None:
    import sample

    try:
        sample.at_sizes([], sizes)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def check_optimizer_settings(cfg: dict) -> None:
    """Values the optimizer and schedule would refuse (or misread) later."""
    betas = cfg["betas"]
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
        raise ConfigError(f"betas={betas!r}: two numbers in [0, 1), e.g. (0.9, 0.999)")
    if cfg["weight_decay"] < 0:
        raise ConfigError(f"weight_decay must be >= 0, got {cfg['weight_decay']}")
    warmup = cfg["lr_warmup_steps"]
    if warmup < 0 or (warmup >= 1 and warmup != int(warmup)):
        raise ConfigError(f"lr_warmup_steps={warmup}: a whole number of steps, or a fraction of the run below 1 "
                          "(0.1 = the first 10% of the steps)")
    if warmup > cfg["max_train_steps"] and not cfg["max_train_epochs"]:
        raise ConfigError(f"lr_warmup_steps={warmup} must be between 0 and max_train_steps "
                          f"({cfg['max_train_steps']})")
    if warmup and cfg["lr_scheduler"] == "constant":
        raise ConfigError(f"lr_scheduler='constant' has no warmup but lr_warmup_steps={warmup}: use "
                          "'constant_with_warmup' or lr_warmup_steps=0")
    for key in ("max_train_epochs", "save_every_n_epochs", "sample_every_n_epochs"):
        if cfg[key] < 0:
            raise ConfigError(f"{key} must be >= 0 (0 = off), got {cfg[key]}")
    if cfg["eps"] <= 0:
        raise ConfigError(f"eps must be > 0, got {cfg['eps']}")


LORA_ONLY_KEYS = ("network_dim", "network_alpha", "network_dropout", "group_ranks", "rank_dropout", "module_dropout",
                  "use_dora", "split_qkv", "loraplus_lr_ratio", "text_encoder_lr", "network_weights", "lora_format")


def check_training_settings(cfg: dict) -> None:
    """What trains and how it is checked: LoRA keys mean nothing for full fine-tuning."""
    if cfg["validation_count"] < 0:
        raise ConfigError(f"validation_count must be >= 0, got {cfg['validation_count']}")
    if not 0 <= cfg["network_dropout"] < 1:
        raise ConfigError(f"network_dropout must be in [0, 1), got {cfg['network_dropout']}")
    if cfg["network_alpha"] < 0:
        raise ConfigError(f"network_alpha must be >= 0 (0 means alpha = rank), got {cfg['network_alpha']}")
    for key in ("rank_dropout", "module_dropout"):
        if not 0 <= cfg[key] < 1:
            raise ConfigError(f"{key} must be in [0, 1), got {cfg[key]}")
    if cfg["loraplus_lr_ratio"] < 0:
        raise ConfigError(f"loraplus_lr_ratio must be >= 0 (0 is off), got {cfg['loraplus_lr_ratio']}")
    bad_rates = {k: v for k, v in cfg["text_encoder_lr"].items() if not isinstance(v, (int, float)) or v < 0}
    if bad_rates:
        raise ConfigError(f"text_encoder_lr={bad_rates}: each rate a number >= 0 (0 freezes that encoder's LoRA)")
    import families

    if cfg["train_mode"] == "full":
        # what selects the weights works for full fine-tuning too (the blocks a family's keys leave out
        # stay frozen; a `targets` preset trains its layers); ranks, dropouts and files are LoRA's
        selection = {k for f in families.FAMILIES.values() for k in f.trained_config_keys}
        family_keys = {k for f in families.FAMILIES.values() for k in f.lora_config_keys} - selection
        set_keys = sorted(k for k in LORA_ONLY_KEYS + tuple(family_keys) if cfg[k] != DEFAULTS[k])
        if set_keys:
            raise ConfigError(f"{', '.join(set_keys)}: LoRA settings, but train_mode='full' trains the weights "
                              "themselves; remove them or set train_mode='lora'")
    if cfg["targets"]:
        selection = {k for f in families.FAMILIES.values() for k in f.target_config_keys}
        both = sorted(k for k in selection if cfg[k] != DEFAULTS[k])
        if both:
            raise ConfigError(f"targets={cfg['targets']!r} is a whole selection; {', '.join(both)} would change it "
                              "silently: remove them (group_ranks still sets ranks per group)")


def check_memory_settings(cfg: dict) -> None:
    """Combinations of the memory switches that cannot work."""
    full = cfg["train_mode"] == "full"
    swapping = cfg["blocks_to_swap"] > 0 or cfg["double_blocks_to_swap"] > 0 or cfg["single_blocks_to_swap"] > 0 \
        or cfg["swap_ring"] > 0
    if cfg["fused_backward"] and cfg["max_grad_norm"] > 0:
        raise ConfigError("fused_backward updates each weight before the global gradient norm exists: set "
                          "max_grad_norm=0 (and max_grad_norm_per_param if you want clipping)")
    if cfg["fused_backward"] and cfg["gradient_accumulation_steps"] > 1:
        raise ConfigError("fused_backward updates the weights in every backward: gradient accumulation is not "
                          "possible; set gradient_accumulation_steps=1 or fused_backward=False")
    if cfg["fused_backward"] and cfg["dtype"] == "fp16":
        raise ConfigError("dtype='fp16' scales the loss and skips a step whose gradients overflow, but fused_backward "
                          "updates the weights inside backward, before that is known: use dtype='bf16' with "
                          "fused_backward, or fused_backward=False")
    if cfg["max_grad_norm_per_param"] > 0 and not cfg["fused_backward"]:
        raise ConfigError("max_grad_norm_per_param is for fused_backward; without it use max_grad_norm")
    if full and cfg["fp8_base"]:
        raise ConfigError("fp8_base stores frozen weights in fp8: it needs train_mode='lora'")
    if cfg["fp8_base_cache"] and not cfg["fp8_base"]:
        raise ConfigError("fp8_base_cache keeps the fp8 weights of fp8_base in a file: set fp8_base=True or remove it")
    if full and swapping and cfg["swap_mode"] == "h2d_only":
        raise ConfigError("swap_mode='h2d_only' never copies weights back, so it cannot swap trained weights: "
                          "use swap_mode='exchange' for full fine-tuning")
    if full and swapping and not cfg["fused_backward"]:
        raise ConfigError("full fine-tuning with block swap needs fused_backward=True: each block's weights are "
                          "updated while the block is on the GPU")
    if cfg["offload_activations"] and not cfg["gradient_checkpointing"]:
        raise ConfigError("offload_activations moves the checkpointed block inputs: set gradient_checkpointing=True")
    check_streaming_settings(cfg)
    if cfg["feedforward_chunk"] < 1:
        raise ConfigError(f"feedforward_chunk must be at least 1 token, got {cfg['feedforward_chunk']}")
    if cfg["lora_dtype"] == "bf16":
        if full:
            raise ConfigError("lora_dtype is the LoRA weights' dtype; train_mode='full' trains the model's own "
                              "weights (in dtype): remove lora_dtype")
        if cfg["optimizer"] == "adamw" and not cfg["fused_backward"]:
            raise ConfigError("lora_dtype='bf16' needs stochastically rounded updates, which torch's AdamW does not "
                              "make: use optimizer='adafactor' or 'adamw8bit', or fused_backward=True")
        if not cfg["stochastic_rounding"]:
            raise ConfigError("lora_dtype='bf16' without stochastic_rounding rounds most updates away: set "
                              "stochastic_rounding=True or lora_dtype='fp32'")


def check_streaming_settings(cfg: dict) -> None:
    """The ring and staging: what they replace and what they need."""
    counted = cfg["blocks_to_swap"] > 0 or cfg["double_blocks_to_swap"] > 0 or cfg["single_blocks_to_swap"] > 0
    if cfg["swap_ring"] < 0 or cfg["swap_ring"] == 1:
        raise ConfigError(f"swap_ring={cfg['swap_ring']}: 0 (off) or at least 2 device slots (one block computes "
                          "while the next loads)")
    if cfg["swap_ring"] and counted:
        raise ConfigError("swap_ring streams every block; blocks_to_swap and the per-group counts choose some: set "
                          "one or the other")
    if cfg["swap_staging"] and cfg["swap_mode"] != "h2d_only":
        raise ConfigError("swap_staging reads the swapped weights where loading left them and never writes them "
                          "back: set swap_mode='h2d_only' (a frozen base)")
    if cfg["swap_staging"] and not (counted or cfg["swap_ring"]):
        raise ConfigError("swap_staging is how swapped blocks are read: set swap_ring or blocks_to_swap too")


def warmup_steps(cfg: dict) -> int:
    """lr_warmup_steps in steps: a value below 1 is a fraction of max_train_steps (kohya's rule)."""
    warmup = cfg["lr_warmup_steps"]
    return int(warmup * cfg["max_train_steps"]) if warmup < 1 else int(warmup)


def sections(cfg: dict) -> list[dict]:
    """The dataset sections, each as a whole config: the top level's values with the section's
    own (SECTION_KEYS, or kohya's names in SECTION_ALIASES). No `datasets`: the top level is the
    one section."""
    if not isinstance(cfg["datasets"], (list, tuple)):
        raise ConfigError(f"datasets must be a list of dicts, got {type(cfg['datasets']).__name__}")
    if not cfg["datasets"]:
        return [cfg]
    out = []
    for i, section in enumerate(cfg["datasets"]):
        if not isinstance(section, dict):
            raise ConfigError(f"datasets[{i}] must be a dict like {{'dataset_dir': 'data/me', 'repeats': 2}}, "
                              f"got {section!r}")
        own = {}
        for key, value in section.items():
            key = SECTION_ALIASES.get(key, key)
            if key not in SECTION_KEYS:
                close = difflib.get_close_matches(key, SECTION_KEYS, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"datasets[{i}]: {key!r} cannot be set per section.{hint} A section may set: "
                                  f"{', '.join(SECTION_KEYS)}")
            check_type(f"datasets[{i}]['{key}']", value, DEFAULTS[key])
            own[key] = value
        if not own.get("dataset_dir"):
            raise ConfigError(f"datasets[{i}] has no dataset_dir: each section names its folder of images")
        out.append({**cfg, **own, "datasets": []})
    return out


def bucket_steps(cfg: dict, family) -> int:
    """bucket_reso_steps, or the family's resolution multiple when it is 0."""
    return cfg["bucket_reso_steps"] or family.resolution_multiple(cfg)


def check_data_settings(cfg: dict, family) -> None:
    """The data keys of one section (or of the top level): sizes, buckets, captions, masks."""
    where = f"dataset {cfg['dataset_dir']!r}: " if cfg["datasets"] == [] and cfg["dataset_dir"] else ""
    for key in ("repeats", "resolution", "batch_size"):
        if cfg[key] < 1:
            raise ConfigError(f"{where}{key} must be at least 1, got {cfg[key]}")
    if cfg["crop"] not in ("center", "random"):
        raise ConfigError(f"{where}crop={cfg['crop']!r}: choose 'center' or 'random'")
    multiple = family.resolution_multiple(cfg)
    if cfg["resolution"] % multiple:
        raise ConfigError(f"{where}resolution {cfg['resolution']} must be a multiple of {multiple} for {family.title}")
    if cfg["enable_bucket"]:
        steps = bucket_steps(cfg, family)
        if steps % multiple:
            raise ConfigError(f"{where}bucket_reso_steps={steps} must be a multiple of {multiple} for {family.title}")
        for key in ("min_bucket_reso", "max_bucket_reso"):
            if cfg[key] < steps or cfg[key] % steps:
                raise ConfigError(f"{where}{key}={cfg[key]} must be a positive multiple of bucket_reso_steps ({steps})")
        if not cfg["min_bucket_reso"] <= cfg["resolution"] <= cfg["max_bucket_reso"]:
            raise ConfigError(f"{where}resolution={cfg['resolution']} must lie between min_bucket_reso "
                              f"({cfg['min_bucket_reso']}) and max_bucket_reso ({cfg['max_bucket_reso']})")
    if cfg["keep_tokens"] < 0 or not 0 <= cfg["caption_tag_dropout_rate"] < 1:
        raise ConfigError(f"{where}keep_tokens must be >= 0 and caption_tag_dropout_rate in [0, 1)")
    if not cfg["caption_separator"]:
        raise ConfigError(f"{where}caption_separator is empty: tags need a separator (kohya's is ',')")
    if cfg["masked_loss"] and not cfg["alpha_mask"] and not cfg["mask_dir"]:
        raise ConfigError(f"{where}masked_loss=True needs the masks: mask_dir (mask images named like the images) "
                          "or alpha_mask=True (the images' alpha channels)")


def check_type(key: str, value, default) -> None:
    expected = type(default)
    if key == "lr_warmup_steps" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return  # steps, or a fraction of the run

    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return  # 1 is fine where 1.0 is expected
    if expected is tuple and isinstance(value, list):
        return
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ConfigError(f"{key}={value!r} should be a {expected.__name__} (default {default!r})")


def format_config(cfg: dict) -> str:
    """The resolved config as Python assignments (also a valid config file)."""
    return "".join(f"{k} = {v!r}\n" for k, v in cfg.items())
