# The SDXL CPU demo: a tiny SDXL-shaped UNet (3 levels of 32/64/64 channels, 1 ResBlock per
# level, attention at two levels and in the middle) with tiny CLIP-L and bigG text encoders,
# all in one file laid out as sd_xl_base_1.0.safetensors, learns coloured shapes from 48
# generated 32x32 images. No download, no GPU: 1000 steps of batch 8 took 6:42 wall (246 s of
# CPU) with OMP_NUM_THREADS=1 on 2 cores that other jobs shared (/usr/bin/time -v). On a busy
# machine OMP_NUM_THREADS=1 avoids torch's two threads waiting on each other (15x slower there).
# It skips the VAE and denoises the pixels
# (no ae_path and no first_stage_model keys in the file). Everything else is the SDXL path:
# text encoders read from the checkpoint's conditioner, the size and crop conditioning, the
# DDPM v-prediction loss on a zero-terminal-SNR schedule, Euler sampling with CFG against the
# empty prompt.
#
#   python train.py configs/demo_sdxl.py
#
# Then look at runs/demo_sdxl/samples/ (step 0 is noise; the last step shows the prompted
# colours and shapes: docs/demo_sdxl_samples.png, steps 0, 500, 1000) and runs/demo_sdxl/loss.png.
# Two variants learnt the shapes but not the colours in the same 1000 steps: epsilon on SDXL's own
# schedule (it ends at SNR 0.0047: at 32 px an image's mean colour still shows at t = 999, and the
# samples took the start noise's colours), and v on this schedule with min_snr_gamma = 5 (its
# weight min(SNR, 5) / (SNR + 1) all but drops the noisiest steps, where the colour is chosen).
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
v_parameterization = True        # v-prediction on a zero-terminal-SNR schedule (see above); sampling
zero_terminal_snr = True         # starts from pure noise at t = 999
sample_schedule = "trailing"
caption_dropout_rate = 0.1       # the unconditional prediction that --l (CFG) in the prompts uses
validation_count = 4
validate_every = 100
save_every = 500
sample_every = 500
sample_steps = 30
