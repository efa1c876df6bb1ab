# SDXL LoRA, seed 001's lean recipe (train_opt.py) for 8-12 GB GPUs (RTX 3060 12 GB, RTX 4060
# 8 GB): 768 px, rank 8 / alpha 8 on the attention projections, batch 1 with 8 accumulated,
# lr 1e-4 cosine with 150 warmup steps, 3000 steps, EMA of the LoRA weights, min-SNR gamma 5,
# offset noise 0.1, text embeddings cached on disk, gradient checkpointing, bf16.
#
# Planned peaks, python train.py configs/sdxl_12gb.py --plan (plans: not yet measured on a GPU):
#   plain torch (--kernels=torch): caching 1.72, training 5.31, sampling 6.30, whole run 6.30 GiB
#   Triton kernels (the default):  caching 1.72, training 5.31, sampling 6.30, whole run 6.30 GiB
#   nvidia-smi about 7.2-8.0 GiB (seed 001 states 11.9 GB; its EMA is of the LoRA weights here).
#
#   python train.py configs/sdxl_12gb.py --dataset_dir=/path/to/images
#
# EMA: the seed's decay 0.9999 would leave the EMA weights 74 % at their zero start after 3000
# steps (0.9999^3000); 0.999 averages over the last ~1000 steps. Files: as configs/sdxl_14gb.py.
model_family = "sdxl"
model_path = "models/sd_xl_base_1.0.safetensors"
dataset_dir = "data/my_subject"
instance_prompt = "ohwx"

run_name = "sdxl_lora_12gb"
resolution = 768
batch_size = 1
gradient_accumulation_steps = 8
network_dim = 8
network_alpha = 8.0
group_ranks = {"ff": 0, "proj": 0}  # attention projections only, as the seed
learning_rate = 1e-4
lr_scheduler = "cosine_with_warmup"
lr_warmup_steps = 150
max_train_steps = 3000
ema_decay = 0.999
min_snr_gamma = 5.0
noise_offset = 0.1
