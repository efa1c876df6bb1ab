# The CPU demo: a tiny FLUX-architecture model (2 double + 2 single blocks, width 96) learns
# coloured shapes from 72 generated images (48 square 32x32, 12 landscape 60x20, 12 portrait
# 20x60) in aspect-ratio buckets (the table is printed before the model loads). No download,
# no GPU: about 2 minutes on 2 CPU cores (1:49 wall measured with /usr/bin/time -v). It
# skips the VAE and trains on the pixels directly (ae_path = ""): the "latent" is the
# 3-channel image, packed into 2x2 patches like a FLUX latent. Everything else is the real
# path: caches, flow-matching loss, the loop (full fine-tuning here: a random model has
# everything to learn; train_mode="lora" runs the same loop on LoRA), caption dropout and
# classifier-free guidance in the samples, checkpoints, resume.
#
#   python train.py configs/demo.py
#
# Then look at runs/demo/samples/ (step 0 is noise; the last step shows the prompted
# colours and shapes) and runs/demo/loss.png.
from demo_data import make_demo

_files = make_demo("runs/demo_data", shapes_of_images=True)
dataset_dir = _files["dataset_dir"]
model_path = _files["flux_path"]
clip_l_path = _files["clip_l_path"]
t5_path = _files["t5_path"]
sample_prompts = _files["sample_prompts"]
model_overrides = {"axes_dim": [8, 20, 20]}  # tiny head dim (48): the released axes are (16, 56, 56)

run_name = "demo"
device = "cpu"
dtype = "fp32"                  # bf16 matmuls are slow on most CPUs
resolution = 32                 # the training area: 32 x 32 pixels
enable_bucket = True            # square images train at 32x32, landscape at 48x16, portrait at 16x48
min_bucket_reso = 16
max_bucket_reso = 48
t5_max_length = 8               # "a red circle" + end token fits
train_mode = "full"             # the random tiny model has everything to learn
max_train_steps = 1000
batch_size = 8
learning_rate = 2e-3
lr_scheduler = "cosine_with_warmup"
lr_warmup_steps = 20
weight_decay = 0.0
gradient_checkpointing = False
timestep_sampling = "logit_normal"
caption_dropout_rate = 0.1       # the unconditional prediction that --l (CFG) in the prompts uses
validation_count = 4
validate_every = 100
save_every = 500
sample_every = 500
sample_steps = 20
sample_guidance = 1.0
