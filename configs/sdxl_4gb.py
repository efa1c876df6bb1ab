# SDXL LoRA, seed 001's standard recipe (1024 px, rank 16 / alpha 16 on the attention
# projections, accumulation 4, 2000 steps) on a 4 GB GPU (GTX 1650, RTX 3050 4 GB laptop).
# The frozen UNet's transformer Linears are stored in fp8 and 40 of the 60 transformer blocks of
# the deepest level stream from host memory (swap_mode h2d_only: the host copy is the master,
# nothing is copied back): the fewest for which nvidia-smi's estimate stays at most 3.6 GiB
# (39 plans 2.37 GiB, 3.0-3.7 in nvidia-smi);
# blocks_to_swap=63 (all but 2 of that level's transformer blocks and ResBlocks) plans 1.47 GiB.
# fp16 with loss scaling (GTX cards have no bf16). Caching and sampling at 1024 px need a tiled
# VAE to stay under 3 GiB (the fp32 VAE at 1024 px alone allocates several GiB).
#
#   python train.py configs/sdxl_4gb.py --plan       # planned peak 2.34 GiB training (3.0-3.6 GiB in nvidia-smi, 1.9 GiB host memory)
#   python train.py configs/sdxl_4gb.py --dataset_dir=/path/to/images
#
# Files: as configs/sdxl_14gb.py.
model_family = "sdxl"
model_path = "models/sd_xl_base_1.0.safetensors"
dataset_dir = "data/my_subject"
instance_prompt = "ohwx"

run_name = "sdxl_lora_4gb"
dtype = "fp16"
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
