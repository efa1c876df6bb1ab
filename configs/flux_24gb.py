# FLUX.1-dev LoRA on a 24 GB GPU (RTX 3090 / 4090, A5000): rank 16, 1024 px, batch 1,
# latents and text embeddings cached (the VAE and T5 leave the GPU before training),
# gradient checkpointing, bf16 weights. The bf16 base alone is 22.2 GiB, so 10 blocks
# (5 double + 10 single) live in host memory: planned peak 19.53 GiB on the GPU (nvidia-smi
# about 21-23 GiB), 6.7 GiB host memory. With --fp8_base=True --blocks_to_swap=0 instead:
# 14.34 GiB and no swapping, at the cost of an fp8-rounded base.
#
#   python train.py configs/flux_24gb.py --dataset_dir=/path/to/images
#   python train.py configs/flux_24gb.py --plan      # where device memory goes
#
# Files: see README "Where the files come from". Put them under models/ or edit the paths.
flux_path = "models/flux1-dev.safetensors"
ae_path = "models/ae.safetensors"
clip_l_path = "models/clip_l.safetensors"
t5_path = "models/t5xxl_fp16.safetensors"
dataset_dir = "data/my_subject"
instance_prompt = "ohwx"
sample_prompts = "configs/prompts_example.txt"

run_name = "flux_lora_24gb"
resolution = 1024
batch_size = 1
network_dim = 16
network_alpha = 16.0
learning_rate = 1e-4
max_train_steps = 1500
lr_scheduler = "constant_with_warmup"
lr_warmup_steps = 50
gradient_checkpointing = True
dtype = "bf16"
blocks_to_swap = 10
timestep_sampling = "shift"
discrete_flow_shift = 3.1582
model_prediction_type = "raw"
guidance_scale = 1.0
save_every = 250
sample_every = 250
validate_every = 100
validation_count = 2
