# SDXL full fine-tuning (every UNet weight trains) on a 12 GB GPU: 1024 px, batch 1, bf16
# weights with stochastically rounded Adafactor updates fused into backward (no full set of
# gradients, no optimizer state beyond Adafactor's factors), gradient checkpointing. kohya
# reports about 17 GB for its fused-step SDXL fine-tune in fp32.
#
# Planned peaks, python train.py configs/sdxl_full.py --plan (plans: not yet measured on a GPU):
#   plain torch (--kernels=torch): caching 2.82, training 6.87, sampling 7.06, whole run 7.06 GiB
#   Triton kernels (the default):  caching 2.82, training 6.87, sampling 7.06, whole run 7.06 GiB
#   nvidia-smi about 8.0-8.8 GiB.
#
#   python train.py configs/sdxl_full.py --dataset_dir=/path/to/images
#
# Files: as configs/sdxl_14gb.py. The result is a whole UNet in the original key layout.
model_family = "sdxl"
model_path = "models/sd_xl_base_1.0.safetensors"
dataset_dir = "data/my_subject"
instance_prompt = "ohwx"

run_name = "sdxl_full"
train_mode = "full"
resolution = 1024
batch_size = 1
optimizer = "adafactor"
learning_rate = 1e-5
lr_scheduler = "constant_with_warmup"
lr_warmup_steps = 100
max_train_steps = 2000
weight_decay = 0.0
fused_backward = True           # each weight steps as soon as its gradient exists
max_grad_norm = 0.0             # (global clipping needs every gradient at once)
save_dtype = "bf16"
