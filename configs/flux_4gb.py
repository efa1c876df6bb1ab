# FLUX.1-dev LoRA on a 4 GB GPU (RTX 3050 4 GB laptop, RTX 2050, RTX A1000 laptop: Ampere or newer,
# for bf16) and a 16 GB machine: rank 16, 1024 px, batch 1.
# Every one of the 57 blocks streams through one ring of two device slots, each the size of an fp8
# double block (324 MiB; single blocks use part of one), one way (the frozen fp8 base is never
# copied back), the next block's copy running on a side stream while the current block computes.
# The swapped weights are read where loading left them (swap_staging: no pinned copy of all 11 GiB,
# two pinned staging buffers for the blocks in flight), and fp8_base_cache writes the fp8 weights
# once to a file that is memory-mapped afterwards, so they are page cache the OS can drop, not
# process memory. Checkpointed block inputs wait in host memory; the feed-forwards run in chunks of
# 1024 tokens; the LoRA weights are bf16 with stochastically rounded Adafactor updates (factored
# state) made inside backward; text encoders stream one caption at a time while caching; sample
# decodes are tiled.
#
# Planned peaks, python train.py configs/flux_4gb.py --plan (plans: not yet measured on a GPU):
#   plain torch (--kernels=torch): caching 1.41, training 1.71, sampling 1.61, whole run 1.71 GiB
#   Triton kernels (the default):  caching 1.41, training 1.60, sampling 1.61, whole run 1.61 GiB
#   nvidia-smi about 2.4-3.0 GiB with the CUDA context. Host memory for tensors: caching 9.53, training
#   13.19, sampling 11.65 GiB, of which 11.02 are the fp8 block weights (pages of the fp8 file).
#   Without the chunked feed-forwards (--chunk_feedforward=False): whole run 1.87 / 1.71 GiB and 10 %
#   less arithmetic (247 instead of 275 TFLOP per step).
#   Per step 26.0 GB cross PCIe (3.30 s at PCIe 3.0 x8) against 275 TFLOP of arithmetic: a card is
#   transfer-bound only above 83 TFLOP/s sustained, so every 4 GB card is compute-bound.
#
#   python train.py configs/flux_4gb.py --dataset_dir=/path/to/images
#
# Files: see README "Where the files come from". Put them under models/ or edit the paths.
model_path = "models/flux1-dev.safetensors"
ae_path = "models/ae.safetensors"
clip_l_path = "models/clip_l.safetensors"
t5_path = "models/t5xxl_fp16.safetensors"
dataset_dir = "data/my_subject"
instance_prompt = "ohwx"

run_name = "flux_lora_4gb"
resolution = 1024
batch_size = 1
network_dim = 16
network_alpha = 16.0
max_train_steps = 1500
lr_warmup_steps = 50

fp8_base = True                 # frozen block weights as float8_e4m3fn
fp8_base_cache = "models/fp8"   # the fp8 weights written here once (12 GB), then read memory-mapped
swap_ring = 2                   # all 57 blocks pass through two device slots
swap_mode = "h2d_only"          # frozen base: copy in, never back
swap_staging = True             # read the weights as loaded, through two pinned staging buffers
offload_activations = True      # each block's checkpointed inputs wait in host memory for backward
chunk_feedforward = True        # MLPs, linear1 and linear2 in chunks of feedforward_chunk (1024) tokens
lora_dtype = "bf16"             # LoRA weights in bf16, updates stochastically rounded
optimizer = "adafactor"         # factored second moments: a few MB of state
fused_backward = True           # each LoRA weight steps as soon as its gradient is ready
max_grad_norm = 0.0             # no global-norm clipping with the fused step
text_encoder_placement = "stream"  # caching: T5 and CLIP layers pass through the GPU two at a time
text_batch_size = 1             # one caption per text-encoder pass while caching
