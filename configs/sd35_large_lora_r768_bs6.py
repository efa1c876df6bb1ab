# SD3.5 Large LoRA, seed 004's high-spec recipe: rank and alpha 768, batch 6, 1024 px, lr 1.05e-3
# with a cosine schedule and 2400 warmup steps (SimpleTuner reported about 32 GB with its
# adamw_bf16, bf16 LoRA weights and states). Here the 3.2 B LoRA weights train in fp32 with AdamW's
# fp32 state, the base is bf16 and resident, every block is checkpointed: an 80 GB GPU (A100, H100).
#
# Planned peaks, python train.py configs/sd35_large_lora_r768_bs6.py --plan (not yet measured on a GPU):
#   plain torch (--kernels=torch): caching 10.50, training 67.37, sampling 53.49, whole run 67.37 GiB
#   Triton kernels (the default):  caching 10.50, training 67.14, sampling 53.49, whole run 67.14 GiB
#   nvidia-smi about 71.3-75.1 GiB.
#
#   python train.py configs/sd35_large_lora_r768_bs6.py --dataset_dir=/path/to/images
#
# On a 48 GB GPU: optimizer = "adafactor", fused_backward = True, max_grad_norm = 0.0 (training
# planned 35.48 GiB); with fp8_base = True as well, 28.02 GiB. The seed saw images pixelate or turn
# black now and then at this learning rate and suggests 9.5e-4 to play it safer.
#
# Files: as configs/sd35_large_lora.py.
model_family = "sd3"
model_path = "models/sd3.5_large.safetensors"
clip_l_path = "models/clip_l.safetensors"
clip_g_path = "models/clip_g.safetensors"
t5_path = "models/t5xxl_fp16.safetensors"
dataset_dir = "data/my_subject"
instance_prompt = "k4s4"

run_name = "sd35_large_lora_r768"
resolution = 1024
batch_size = 6
network_dim = 768
network_alpha = 768.0
learning_rate = 1.05e-3
lr_scheduler = "cosine_with_warmup"
lr_warmup_steps = 2400
max_train_steps = 24000
caption_dropout_rate = 0.0
save_every = 400
sample_every = 400
