# The DeepFloyd IF CPU demo, stage II: a tiny IF-II-shaped UNet (1.4 M parameters, random weights)
# learns to upscale the demo's shapes 4x. It trains at 64 px: each image shrunk to 16 px,
# upsampled back and noised at an augmentation level drawn per sample is the low-resolution input
# beside the noisy 64 px image (levels up to 0.5 here, so that the low-res image carries its
# content within the demo's few steps; IF's default draws up to 1). Its samples, and the cascade,
# run at 128 px on 32 px low-res images (a convolutional UNet upscales at any size). Run
# configs/demo_if.py first; then the cascade, stage I then stage II:
#
#   python train.py configs/demo_if_stage2.py
#   python sample.py --config configs/demo_if_stage2.py --model runs/demo_if_stage2/demo_if_stage2.safetensors \
#       --base_model runs/demo_if/demo_if.safetensors --prompt "a red circle --d 1" --out cascade.png
#
# The samples in runs/demo_if_stage2/samples/ upscale the dataset's first image (if_sample_low_res).
# Measured (/usr/bin/time -v, OMP_NUM_THREADS=1, 2 CPU cores shared with other jobs): 136 s of CPU,
# 5:59 wall; loss 1.19 at step 1 -> 0.058 at step 400, validation loss 0.066 (step 100) -> 0.031.
# 400 steps keep the low-res image's shape and colour at 128 px, still grainy; more steps sharpen.
from demo_data import make_if_demo

_files = make_if_demo("runs/demo_data")
model_family = "deepfloyd"
model_path = _files["if_stage2"]
t5_path = _files["t5_path"]
dataset_dir = _files["dataset_dir"]
sample_prompts = _files["sample_prompts"]

run_name = "demo_if_stage2"
device = "cpu"
dtype = "fp32"
resolution = 64
train_mode = "full"
max_train_steps = 400
batch_size = 4
learning_rate = 2e-3
lr_scheduler = "cosine_with_warmup"
lr_warmup_steps = 20
weight_decay = 0.0
gradient_checkpointing = False
caption_dropout_rate = 0.1
if_aug_levels = (0.0, 0.5)
validation_count = 4
validate_every = 100
save_every = 400
sample_every = 400
sample_at_start = False
sample_steps = 25
sample_sizes = "128"            # stage I's 32 px images upscaled 4x
