# The SDXL CPU demo: a tiny SDXL-shaped UNet (3 levels of 32/64/64 channels, 1 ResBlock per
# level, attention at two levels and in the middle) with tiny CLIP-L and bigG text encoders,
# all in one file laid out as sd_xl_base_1.0.safetensors, learns coloured shapes from 48
# generated 32x32 images. No download, no GPU. It skips the VAE and denoises the pixels
# (no ae_path and no first_stage_model keys in the file). Everything else is the SDXL path:
# text encoders read from the checkpoint's conditioner, the size and crop conditioning, the
# DDPM epsilon loss with min-SNR weighting, Euler sampling with CFG against the empty prompt.
#
#   python train.py configs/demo_sdxl.py
#
# Then look at runs/demo_sdxl/samples/ (step 0 is noise; the last step shows the prompted
# colours and shapes) and runs/demo_sdxl/loss.png.
from demo_data import make_sdxl_demo

_files = make_sdxl_demo("runs/demo_sdxl_data")
dataset_dir = _files["dataset_dir"]
model_path = _files["model_path"]
sample_prompts = _files["sample_prompts"]
model_overrides = {"num_head_channels": 16}  # not in the shapes (SDXL's heads are 64 wide)

run_name = "demo_sdxl"
device = "cpu"
dtype = "fp32"                  # bf16 matmuls are slow on most CPUs
resolution = 32
train_mode = "full"             # the random tiny model has everything to learn
max_train_steps = 1000
batch_size = 8
learning_rate = 1e-3
lr_scheduler = "cosine_with_warmup"
lr_warmup_steps = 20
weight_decay = 0.0
gradient_checkpointing = False
min_snr_gamma = 5.0
caption_dropout_rate = 0.1       # the unconditional prediction that --l (CFG) in the prompts uses
validation_count = 4
validate_every = 100
save_every = 500
sample_every = 500
sample_steps = 30
