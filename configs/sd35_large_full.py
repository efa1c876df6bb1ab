# SD3.5 Large full fine-tuning on a 12 GB GPU (RTX 3060 12 GB, RTX 4070 / 4070 Ti): all 8.06 B weights
# train, 1024 px, batch 1 (seed 004 used DeepSpeed offload on an 80 GB H100 for this). Weights
# stay bf16 and take stochastically rounded updates; Adafactor steps each weight inside backward,
# the moment its gradient is ready, so no full set of gradients ever exists; 19 of the 38 joint
# blocks swap through host memory in exchange mode (weights go back with their updates), the
# fewest that keep the plain-torch plan under 10 GiB; the text encoders stream while caching.
# On a 24 GB GPU nothing needs to swap (blocks_to_swap = 0: training planned 16.53 GiB).
#
# Planned peaks, python train.py configs/sd35_large_full.py --plan (plans: not yet measured on a GPU):
#   plain torch (--kernels=torch): caching 1.41, training 9.63, sampling 8.50, whole run 9.63 GiB
#   Triton kernels (the default):  caching 1.41, training 9.14, sampling 8.50, whole run 9.14 GiB
#   nvidia-smi about 10.2-11.1 GiB; 7.9 GiB of host memory for tensors while training.
#
#   python train.py configs/sd35_large_full.py --dataset_dir=/path/to/images
#
# Seed 004's advice for full fine-tuning, one line each: train_joint_blocks = "0-33" (the last
# blocks frozen), freeze_embedders = True (the embedders frozen); frozen weights get no gradient.
#
# Files: as configs/sd35_large_lora.py.
model_family = "sd3"
model_path = "models/sd3.5_large.safetensors"
clip_l_path = "models/clip_l.safetensors"
clip_g_path = "models/clip_g.safetensors"
t5_path = "models/t5xxl_fp16.safetensors"
dataset_dir = "data/my_subject"
instance_prompt = "ohwx"

run_name = "sd35_large_full"
train_mode = "full"
resolution = 1024
batch_size = 1
learning_rate = 5e-6            # seed 004 used 5e-5 at batch 6
max_train_steps = 2000
lr_warmup_steps = 100
save_dtype = "bf16"

dtype = "bf16"                  # weights stored in bf16 ...
stochastic_rounding = True      # ... with updates rounded stochastically, so small steps add up
optimizer = "adafactor"
weight_decay = 0.0
fused_backward = True           # step each weight inside backward: gradients never all exist
max_grad_norm = 0.0             # no global-norm clipping with the fused step
blocks_to_swap = 19             # of 38 joint blocks live in host memory (at most 36)
swap_mode = "exchange"          # trained weights go back to the host with their updates
text_encoder_placement = "stream"  # caching: T5 and CLIP layers pass through the GPU two at a time
