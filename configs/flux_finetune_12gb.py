# FLUX.1-dev full fine-tuning on a 12 GB GPU (RTX 3060 12 GB, RTX 4070 / 4070 Ti): every
# weight trains, 1024 px, batch 1. Weights stay bf16 and take stochastically rounded updates;
# Adafactor (factored state) steps each weight inside backward, the moment its gradient is
# ready, so no full set of gradients ever exists; 26 blocks (13 double + 26 single) swap
# through host memory in exchange mode (weights go back with their updates).
#
#   python train.py configs/flux_finetune_12gb.py --plan   # planned peak 9.32 GiB on the GPU, 16.0 GiB host memory
#   python train.py configs/flux_finetune_12gb.py --dataset_dir=/path/to/images
#
# The plan assumes the Triton optimizer kernels (kernels="auto" with triton installed, as CUDA
# wheels of torch have it). The torch fallback makes fp32 temporaries per weight inside backward
# (10.45 GiB planned): without Triton, use --blocks_to_swap=27 (9.93 GiB).
#
# Files: see README "Where the files come from". Put them under models/ or edit the paths.
flux_path = "models/flux1-dev.safetensors"
ae_path = "models/ae.safetensors"
clip_l_path = "models/clip_l.safetensors"
t5_path = "models/t5xxl_fp16.safetensors"
dataset_dir = "data/my_subject"
instance_prompt = "ohwx"

run_name = "flux_finetune_12gb"
train_mode = "full"
resolution = 1024
batch_size = 1
learning_rate = 5e-6            # full fine-tuning takes a much smaller step than LoRA
max_train_steps = 1500
lr_warmup_steps = 50
save_dtype = "bf16"

dtype = "bf16"                  # weights stored in bf16 ...
stochastic_rounding = True      # ... with updates rounded stochastically, so small steps add up
optimizer = "adafactor"
weight_decay = 0.0
fused_backward = True           # step each weight inside backward: gradients never all exist
max_grad_norm = 0.0             # no global-norm clipping with the fused step
blocks_to_swap = 26             # 13 double + 26 single blocks live in host memory
swap_mode = "exchange"          # trained weights go back to the host with their updates
