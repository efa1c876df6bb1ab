# SD3.5 Medium LoRA on an 8 GB GPU (RTX 3060 Ti / 3070 / 4060): rank 32, batch 1, 1024 px.
# The frozen base is stored in fp8, AdamW, gradient checkpointing, latents and text embeddings
# cached, the text encoders streamed while caching; no block swap needed. Samples: 50 steps of
# DPM++ 2M, CFG 5 (the reference's settings); sample_slg_scale = 2.5 adds the reference's
# skip-layer guidance (layers 7, 8, 9).
#
# Planned peaks, python train.py configs/sd35_medium_lora.py --plan (plans: not yet measured on a GPU):
#   plain torch (--kernels=torch): caching 1.41, training 4.01, sampling 3.89, whole run 4.01 GiB
#   Triton kernels (the default):  caching 1.41, training 3.97, sampling 3.89, whole run 3.97 GiB
#   nvidia-smi about 4.7-5.4 GiB. (A bf16 base, fp8_base = False: training 6.04 GiB.)
#
#   python train.py configs/sd35_medium_lora.py --dataset_dir=/path/to/images
#
# Multi-resolution training as kohya offers it for this model: pos_emb_random_crop_rate = 0.2 or
# enable_scaled_pos_embed = True.
#
# Files (stabilityai/stable-diffusion-3.5-medium): sd3.5_medium.safetensors (with its VAE) and
# text_encoders/clip_l.safetensors, clip_g.safetensors, t5xxl_fp16.safetensors, with the
# tokenizer/, tokenizer_2/, tokenizer_3/ folders beside them. Put them under models/.
model_family = "sd3"
model_path = "models/sd3.5_medium.safetensors"
clip_l_path = "models/clip_l.safetensors"
clip_g_path = "models/clip_g.safetensors"
t5_path = "models/t5xxl_fp16.safetensors"
dataset_dir = "data/my_subject"
instance_prompt = "ohwx"

run_name = "sd35_medium_lora"
resolution = 1024
batch_size = 1
network_dim = 32
network_alpha = 32.0
learning_rate = 1e-4
max_train_steps = 2000
lr_warmup_steps = 100

fp8_base = True                 # frozen block weights as float8_e4m3fn
text_encoder_placement = "stream"  # caching: T5 and CLIP layers pass through the GPU two at a time
