# FLUX.1-dev LoRA on a 12 GB GPU (RTX 3060 12 GB, RTX 4070 / 4070 Ti): rank 16, 1024 px,
# batch 1. The frozen base is stored in fp8 (half the bytes of bf16) and 23 blocks swap
# to host memory (11 double + 24 single: one more than the fewest for which the whole run stays
# under 8 GiB on the plain-torch path, 22 at 7.99 GiB, for a margin); AdamW, gradient
# checkpointing, latents and text embeddings cached, the text encoders' layers streamed
# through the GPU while caching.
#
# Planned peaks, python train.py configs/flux_12gb.py --plan (plans: not yet measured on a GPU):
#   plain torch (--kernels=torch): caching 2.56, training 7.72, sampling 7.52, whole run 7.72 GiB
#   Triton kernels (the default):  caching 2.56, training 7.58, sampling 7.52, whole run 7.58 GiB
#   nvidia-smi about 8.7-9.6 GiB; 7.1 GiB of host memory for tensors while training.
#
#   python train.py configs/flux_12gb.py --dataset_dir=/path/to/images
#
# Files: see README "Where the files come from". Put them under models/ or edit the paths.
model_path = "models/flux1-dev.safetensors"
ae_path = "models/ae.safetensors"
clip_l_path = "models/clip_l.safetensors"
t5_path = "models/t5xxl_fp16.safetensors"
dataset_dir = "data/my_subject"
instance_prompt = "ohwx"

run_name = "flux_lora_12gb"
resolution = 1024
batch_size = 1
network_dim = 16
network_alpha = 16.0
max_train_steps = 1500
lr_warmup_steps = 50

fp8_base = True                 # frozen block weights as float8_e4m3fn: 11 GiB instead of 22
blocks_to_swap = 23             # 11 double + 24 single blocks live in host memory
text_encoder_placement = "stream"  # caching: T5 and CLIP layers pass through the GPU two at a time
