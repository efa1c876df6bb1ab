# FLUX.1-dev LoRA on a 6 GB GPU (RTX 2060 / 3060 laptop / 4050): rank 16, 1024 px, batch 1.
# A lean recipe (configs/flux_4gb.py goes further): fp8 base; 29 blocks (14 double + 30 single)
# stream from host memory one way only (swap_mode="h2d_only": the frozen host copy is the
# master, nothing is copied back); checkpointed block inputs in host memory; Adafactor
# (factored state, a few MB) stepping inside backward, so the LoRA gradients never exist all at
# once; text encoders streamed while caching; sample decodes tiled.
#
# Planned peaks, python train.py configs/flux_6gb.py --plan (plans: not yet measured on a GPU):
#   plain torch (--kernels=torch): caching 2.56, training 4.02, sampling 3.76, whole run 4.02 GiB
#   Triton kernels (the default):  caching 2.56, training 3.86, sampling 3.76, whole run 3.86 GiB
#   nvidia-smi about 4.8-5.5 GiB; 13.45 GiB of host memory for tensors while training, of which
#   11.02 are the fp8 block weights read as pages of the fp8 file (swap_staging, fp8_base_cache:
#   the OS can drop and reread them) and 0.90 pinned staging buffers: fits 16 GB of RAM.
#
#   python train.py configs/flux_6gb.py --dataset_dir=/path/to/images
#
# Files: see README "Where the files come from". Put them under models/ or edit the paths.
model_path = "models/flux1-dev.safetensors"
ae_path = "models/ae.safetensors"
clip_l_path = "models/clip_l.safetensors"
t5_path = "models/t5xxl_fp16.safetensors"
dataset_dir = "data/my_subject"
instance_prompt = "ohwx"

run_name = "flux_lora_6gb"
resolution = 1024
batch_size = 1
network_dim = 16
network_alpha = 16.0
max_train_steps = 1500
lr_warmup_steps = 50

fp8_base = True                 # frozen block weights as float8_e4m3fn
blocks_to_swap = 29             # 14 double + 30 single blocks stream from host memory
swap_mode = "h2d_only"          # frozen base: copy in, never back (half the transfers)
swap_staging = True             # read the weights as loaded, through pinned staging buffers: fits 16 GB of RAM
fp8_base_cache = "models/fp8"   # the fp8 weights written here once (12 GB), then read memory-mapped
offload_activations = True      # each block's checkpointed inputs wait in host memory for backward
optimizer = "adafactor"         # factored second moments: a few MB of state instead of 0.6 GiB
fused_backward = True           # each LoRA weight steps as soon as its gradient is ready
max_grad_norm = 0.0             # no global-norm clipping with the fused step
text_encoder_placement = "stream"  # caching: T5 and CLIP layers pass through the GPU two at a time
