# The SD3 CPU demo: a tiny SD3.5-shaped MMDiT (2 joint blocks, width 128, QK RMSNorm, attn2 in
# block 0, the pre-only last context block) learns coloured shapes from 48 generated 32x32
# images, conditioned by tiny random CLIP-L, CLIP-G and T5 encoders through the real SD3 text
# recipe. No download, no GPU. Like configs/demo.py it skips the VAE and denoises the pixels
# (a model file without first_stage_model: the family then uses pixels). Everything else is the
# SD3 path: the cached text parts with per-encoder dropout, logit-normal sigmas, the
# x0-preconditioned loss, DPM++ 2M sampling with CFG against the empty prompt, checkpoints, resume.
#
#   python train.py configs/demo_sd3.py
#
# Then look at runs/demo_sd3/samples/ (step 0 is noise; the last step shows the prompted
# colours and shapes) and runs/demo_sd3/loss.png.
from demo_data import make_sd3_demo

_files = make_sd3_demo("runs/demo_sd3_data")
model_family = "sd3"
model_path = _files["model_path"]
clip_l_path = _files["clip_l_path"]
clip_g_path = _files["clip_g_path"]
t5_path = _files["t5_path"]
dataset_dir = _files["dataset_dir"]
sample_prompts = _files["sample_prompts"]

run_name = "demo_sd3"
device = "cpu"
dtype = "fp32"                  # bf16 matmuls are slow on most CPUs
resolution = 32
t5_max_length = 8               # "a red circle" + end token fits
train_mode = "full"             # the random tiny model has everything to learn
max_train_steps = 1000
batch_size = 8
learning_rate = 1e-3
lr_scheduler = "cosine_with_warmup"
lr_warmup_steps = 20
weight_decay = 0.0
gradient_checkpointing = False
caption_dropout_rate = 0.1      # the unconditional prediction that CFG (--l in the prompts) uses
t5_dropout_rate = 0.1           # and kohya's per-encoder dropout: T5's part alone becomes zeros
validation_count = 4
validate_every = 100
save_every = 500
sample_every = 500
sample_steps = 20
