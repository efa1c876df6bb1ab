# SDXL LoRA, seed 001's standard recipe (1024 px, rank 16 / alpha 16 on the attention
# projections, accumulation 4, 2000 steps) on a 4 GB GPU (GTX 1650, RTX 3050 4 GB laptop).
# The frozen UNet's transformer Linears are stored in fp8 and 40 of the 60 transformer blocks of
# the deepest level stream from host memory (swap_mode h2d_only: the host copy is the master,
# nothing is copied back), which leaves 0.6 GiB of the 3 GiB goal; blocks_to_swap=63 (all but 2
# of that level's transformer blocks and ResBlocks) plans training 1.47 and the whole run 1.60 GiB
# (the text encoders while caching). fp16 with loss scaling (GTX cards have no bf16), and the
# fp16-fix VAE in fp16.
#
# Planned peaks, python train.py configs/sdxl_4gb.py --plan (plans: not yet measured on a GPU):
#   plain torch (--kernels=torch): caching 1.60, training 2.34, sampling 2.39, whole run 2.39 GiB
#   Triton kernels (the default):  caching 1.60, training 2.34, sampling 2.39, whole run 2.39 GiB
#   nvidia-smi about 3.1-3.7 GiB; 1.9 GiB of host memory for tensors while training.
#
#   python train.py configs/sdxl_4gb.py --dataset_dir=/path/to/images
#
# Files: as configs/sdxl_14gb.py, plus sdxl_vae.safetensors from madebyollin/sdxl-vae-fp16-fix
# (the released VAE overflows in fp16; in fp32 it would plan 2.82 GiB while caching and 3.07 GiB
# while decoding samples).
model_family = "sdxl"
model_path = "models/sd_xl_base_1.0.safetensors"
ae_path = "models/sdxl_vae.safetensors"  # madebyollin/sdxl-vae-fp16-fix: the VAE that runs in fp16
dataset_dir = "data/my_subject"
instance_prompt = "ohwx"

run_name = "sdxl_lora_4gb"
dtype = "fp16"
no_half_vae = False             # the fp16-fix VAE in fp16: half the caching and decode memory of fp32
resolution = 1024
batch_size = 1
gradient_accumulation_steps = 4
network_dim = 16
network_alpha = 16.0
group_ranks = {"ff": 0, "proj": 0}
learning_rate = 1e-4
lr_scheduler = "cosine_with_warmup"
lr_warmup_steps = 100
max_train_steps = 2000

fp8_base = True                 # transformer Linears as float8_e4m3fn
blocks_to_swap = 40             # 40 of the 60 level-2 transformer blocks (fp8, 33 MiB each) stream from host memory
swap_mode = "h2d_only"
