# FLUX.1-dev LoRA on a 24 GB GPU (RTX 3090 / 4090, A5000): rank 16, 1024 px, batch 1,
# gradient checkpointing, bf16 weights; latents and text embeddings cached (the VAE, CLIP and
# T5 leave the GPU before training). The bf16 base alone is 22.2 GiB, so 10 blocks
# (5 double + 10 single) live in host memory. With --fp8_base=True --blocks_to_swap=0
# instead: 14.37 GiB whole run (plain torch) and no swapping, at the cost of an fp8-rounded base.
#
# Planned peaks, python train.py configs/flux_24gb.py --plan (plans: not yet measured on a GPU):
#   plain torch (--kernels=torch): caching 10.60, training 19.59, sampling 19.38, whole run 19.59 GiB
#   Triton kernels (the default):  caching 10.60, training 19.45, sampling 19.38, whole run 19.45 GiB
#   nvidia-smi about 21-23 GiB; 6.7 GiB of host memory for tensors.
#
#   python train.py configs/flux_24gb.py --dataset_dir=/path/to/images
#
# Files: see README "Where the files come from". Put them under models/ or edit the paths.
model_path = "models/flux1-dev.safetensors"
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
