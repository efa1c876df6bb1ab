# FLUX.1-dev LoRA on an 8 GB GPU (RTX 3060 Ti / 3070 / 4060): rank 16, 1024 px, batch 1.
# fp8 base, 26 blocks swapped to host memory (13 double + 26 single), and the checkpointed
# block inputs kept in host memory too (offload_activations); AdamW, gradient checkpointing;
# text encoders streamed while caching; sample decodes tiled when a whole decode would not fit.
#
# Planned peaks, python train.py configs/flux_8gb.py --plan (plans: not yet measured on a GPU):
#   plain torch (--kernels=torch): caching 2.56, training 5.70, sampling 5.16, whole run 5.70 GiB
#   Triton kernels (the default):  caching 2.56, training 5.53, sampling 5.16, whole run 5.53 GiB
#   nvidia-smi about 6.6-7.4 GiB; 9.5 GiB of host memory for tensors while training.
#
#   python train.py configs/flux_8gb.py --dataset_dir=/path/to/images
#
# Files: see README "Where the files come from". Put them under models/ or edit the paths.
model_path = "models/flux1-dev.safetensors"
ae_path = "models/ae.safetensors"
clip_l_path = "models/clip_l.safetensors"
t5_path = "models/t5xxl_fp16.safetensors"
dataset_dir = "data/my_subject"
instance_prompt = "ohwx"

run_name = "flux_lora_8gb"
resolution = 1024
batch_size = 1
network_dim = 16
network_alpha = 16.0
max_train_steps = 1500
lr_warmup_steps = 50

fp8_base = True                 # frozen block weights as float8_e4m3fn
blocks_to_swap = 26             # 13 double + 26 single blocks live in host memory
offload_activations = True      # each block's checkpointed inputs wait in host memory for backward
text_encoder_placement = "stream"  # caching: T5 and CLIP layers pass through the GPU two at a time
