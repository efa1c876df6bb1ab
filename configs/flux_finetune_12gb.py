# FLUX.1-dev full fine-tuning on a 12 GB GPU (RTX 3060 12 GB, RTX 4070 / 4070 Ti): every
# weight trains, 1024 px, batch 1. Weights stay bf16 and take stochastically rounded updates;
# Adafactor (factored state) steps each weight inside backward, the moment its gradient is
# ready, so no full set of gradients ever exists; 28 blocks (14 double + 28 single) swap
# through host memory in exchange mode (weights go back with their updates); text encoders
# streamed while caching.
#
# Planned peaks, python train.py configs/flux_finetune_12gb.py --plan (plans: not yet measured):
#   plain torch (--kernels=torch): caching 2.56, training 9.29, sampling 8.11, whole run 9.29 GiB
#   Triton kernels (the default):  caching 2.56, training 8.16, sampling 8.11, whole run 8.16 GiB
#   nvidia-smi about 10.3-11.3 GiB; 17.1 GiB of host memory for tensors while training.
#   (The torch path makes fp32 temporaries per weight inside backward; Triton's update does not.)
#
#   python train.py configs/flux_finetune_12gb.py --dataset_dir=/path/to/images
#
# Files: see README "Where the files come from". Put them under models/ or edit the paths.
model_path = "models/flux1-dev.safetensors"
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
blocks_to_swap = 28             # 14 double + 28 single blocks live in host memory
swap_mode = "exchange"          # trained weights go back to the host with their updates
text_encoder_placement = "stream"  # caching: T5 and CLIP layers pass through the GPU two at a time
