# SD3.5 Large LoRA on a 6 GB GPU (RTX 2060 / 3060 laptop / 4050): rank 64, batch 1, 1024 px, the
# low-memory recipe of seed 004 (SimpleTuner took 18.83 GB for it). The frozen base is stored in
# fp8; 28 of the 38 joint blocks stream from host memory one way (swap_mode="h2d_only": the frozen
# host copy is the master); checkpointed block inputs wait in host memory; Adafactor steps each
# LoRA weight inside backward, so the 270 M LoRA weights' gradients never exist all at once; the
# text encoders stream through the GPU while caching; sample decodes tiled. 24 swapped blocks
# would also plan under 5 GiB (4.74 on the torch path), but nvidia-smi would then show up to 6.3.
#
# Planned peaks, python train.py configs/sd35_large_lora.py --plan (plans: not yet measured on a GPU):
#   plain torch (--kernels=torch): caching 1.41, training 3.92, sampling 3.94, whole run 3.94 GiB
#   Triton kernels (the default):  caching 1.41, training 3.88, sampling 3.94, whole run 3.94 GiB
#   nvidia-smi about 4.7-5.4 GiB; 8.2 GiB of host memory for tensors while training.
#
#   python train.py configs/sd35_large_lora.py --dataset_dir=/path/to/images
#
# Files (stabilityai/stable-diffusion-3.5-large): sd3.5_large.safetensors (with its VAE) and
# text_encoders/clip_l.safetensors, clip_g.safetensors, t5xxl_fp16.safetensors, with the
# tokenizer/, tokenizer_2/, tokenizer_3/ folders of the same repository beside them (or set
# clip_tokenizer, clip_g_tokenizer, t5_tokenizer). Put them under models/ or edit the paths.
# The LoRA file is in diffusers names (the SD3 default): diffusers' StableDiffusion3Pipeline
# and ComfyUI load it; lora_format = "kohya" writes kohya's lora_unet_joint_blocks_* names.
#
# Seed 004's layer advice is one line each (see families/sd3.py):
#   train_joint_blocks = "30-37"   (fine detail)     train_joint_blocks = "12-24"   (composition)
#   train_joint_blocks = "0-33"    (last blocks frozen, photorealism)
#   group_ranks = {"context_mlp": 0, "x_mlp": 0, "context_mod": 0, "x_mod": 0}   (attention only)
#   group_ranks = {"x_attn": 0, "x_mlp": 0, "x_mod": 0}                          (context blocks only)
model_family = "sd3"
model_path = "models/sd3.5_large.safetensors"
clip_l_path = "models/clip_l.safetensors"
clip_g_path = "models/clip_g.safetensors"
t5_path = "models/t5xxl_fp16.safetensors"
dataset_dir = "data/my_subject"
instance_prompt = "ohwx"

run_name = "sd35_large_lora"
resolution = 1024
batch_size = 1
network_dim = 64
network_alpha = 64.0
learning_rate = 1e-4
max_train_steps = 2000
lr_warmup_steps = 100

fp8_base = True                 # frozen block weights as float8_e4m3fn: 7.5 GiB instead of 15
blocks_to_swap = 28             # of 38 joint blocks (at most 36, kohya's depth - 2)
swap_mode = "h2d_only"          # frozen base: copy in, never back (half the transfers)
offload_activations = True      # each block's checkpointed inputs wait in host memory for backward
optimizer = "adafactor"         # factored second moments: MB of state instead of 2 GiB
fused_backward = True           # each LoRA weight steps as soon as its gradient is ready
max_grad_norm = 0.0             # no global-norm clipping with the fused step
text_encoder_placement = "stream"  # caching: T5 and CLIP layers pass through the GPU two at a time
