# SDXL LoRA, seed 001's standard recipe (train_sdxl.py) on a 12-16 GB GPU (RTX 4070 Ti, RTX 3060
# 12 GB, RTX 4080): 1024 px, rank 16 / alpha 16 on the attention projections (to_q, to_k, to_v,
# to_out.0 of every self- and cross-attention: 560 modules, 23.2 M parameters), batch 1 with 4
# accumulated (effective 4), lr 1e-4 cosine with 100 warmup steps, 2000 steps, fp16 with loss
# scaling (the VAE stays fp32), gradient checkpointing, latents and text embeddings cached.
#
# Planned peaks, python train.py configs/sdxl_14gb.py --plan (plans: not yet measured on a GPU):
#   plain torch (--kernels=torch): caching 2.82, training 5.69, sampling 6.41, whole run 6.41 GiB
#   Triton kernels (the default):  caching 2.82, training 5.69, sampling 6.41, whole run 6.41 GiB
#   nvidia-smi about 7.3-8.1 GiB. (Seed 001 states 13-14 GB with both text encoders kept on the GPU
#   and encoding every step; here they run only while caching, then leave.)
#
#   python train.py configs/sdxl_14gb.py --dataset_dir=/path/to/images
#
# Files: sd_xl_base_1.0.safetensors holds the UNet, both text encoders and the VAE. Put it under
# models/ (or edit the path); the CLIP tokenizer folder goes to models/tokenizer (see README).
# For the fp16-fix VAE add ae_path = "models/sdxl_vae.safetensors" (either layout).
model_family = "sdxl"
model_path = "models/sd_xl_base_1.0.safetensors"
dataset_dir = "data/my_subject"
instance_prompt = "ohwx"

run_name = "sdxl_lora_14gb"
dtype = "fp16"                  # seed 001: mixed precision fp16 (LoRA weights fp32, loss scaling)
resolution = 1024
batch_size = 1
gradient_accumulation_steps = 4
network_dim = 16
network_alpha = 16.0
group_ranks = {"ff": 0, "proj": 0}  # attention projections only, as the seed (diffusers' to_q/to_k/to_v/to_out.0)
learning_rate = 1e-4
lr_scheduler = "cosine_with_warmup"
lr_warmup_steps = 100
max_train_steps = 2000
