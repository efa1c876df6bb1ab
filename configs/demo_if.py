# The DeepFloyd IF CPU demo, stage I: a tiny IF-shaped UNet (1.3 M parameters, random weights) learns
# the coloured shapes of 48 generated 32x32 images, captioned by a tiny random T5. No download, no
# GPU. The real IF path throughout: pixels (no VAE), T5 states cached in bf16, the cosine DDPM with
# the learned variance (hybrid VLB loss), caption dropout, IF's sampler (respacing, learned
# variance, dynamic thresholding, CFG). Full fine-tuning here: a random model has everything to
# learn (train_mode="lora" runs the same loop on LoRA).
#
#   python train.py configs/demo_if.py            # stage I
#   python train.py configs/demo_if_stage2.py     # then stage II (4x upscaling)
#   python sample.py --config configs/demo_if_stage2.py --model runs/demo_if_stage2/demo_if_stage2.safetensors \
#       --base_model runs/demo_if/demo_if.safetensors --prompt "a red circle --d 1" --out cascade.png
#
# Then look at runs/demo_if/samples/ (step 0 is noise; the last step shows the prompted colours
# and shapes) and runs/demo_if/loss.png. Measured (/usr/bin/time -v, OMP_NUM_THREADS=1, 2 shared CPU
# cores): 313-357 s of CPU, 9:58 wall on a quiet machine, 21:57 on a busy one; loss 1.12 at step 1 ->
# 0.008 at step 1500, validation loss 0.089 (step 100) -> 0.021. docs/demo_if_samples.png shows
# steps 0, 500, 1000 and 1500.
# The backgrounds come out tinted per seed: a tiny epsilon-predicting model is least exact near
# t = 999, where IF's x0 = (x - sqrt(1 - abar) eps) / sqrt(abar) divides by ~1e-4.
from demo_data import make_if_demo

_files = make_if_demo("runs/demo_data")
model_family = "deepfloyd"
model_path = _files["if_stage1"]
t5_path = _files["t5_path"]
dataset_dir = _files["dataset_dir"]
sample_prompts = _files["sample_prompts"]

run_name = "demo_if"
device = "cpu"
dtype = "fp32"                  # bf16 matmuls are slow on most CPUs
resolution = 32
train_mode = "full"             # the random tiny model has everything to learn
max_train_steps = 1500
batch_size = 8
learning_rate = 2e-3
lr_scheduler = "cosine_with_warmup"
lr_warmup_steps = 20
weight_decay = 0.0
gradient_checkpointing = False
caption_dropout_rate = 0.1      # the unconditional prediction CFG (IF's 7) samples against
validation_count = 4
validate_every = 100
save_every = 500
sample_every = 500
sample_steps = 50               # respacing "50" (IF's stage I default is "150")
