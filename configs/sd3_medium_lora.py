# SD3 Medium LoRA on an 8 GB GPU (RTX 3060 Ti / 3070 / 4060): rank 16, batch 1, 1024 px, from
# the all-in-one file with CLIP-L, CLIP-G and T5-XXL inside: the text encoders and the VAE are
# read from its text_encoders.* and first_stage_model sections (clip_l_path etc. stay empty).
# The base stays bf16 and resident, AdamW, gradient checkpointing; no block swap needed; the text
# encoders stream through the GPU while caching.
#
# Planned peaks, python train.py configs/sd3_medium_lora.py --plan (plans: not yet measured on a GPU):
#   plain torch (--kernels=torch): caching 1.41, training 4.81, sampling 4.88, whole run 4.88 GiB
#   Triton kernels (the default):  caching 1.41, training 4.79, sampling 4.88, whole run 4.88 GiB
#   nvidia-smi about 5.7-6.4 GiB. (An fp8 base, fp8_base = True: training 2.93 GiB.)
#
#   python train.py configs/sd3_medium_lora.py --dataset_dir=/path/to/images
#
# Files (stabilityai/stable-diffusion-3-medium): sd3_medium_incl_clips_t5xxlfp16.safetensors with
# the tokenizer/ (CLIP) and tokenizer_3/ (T5) folders of the repository beside it. With
# sd3_medium_incl_clips.safetensors (no T5) the T5 part of the context is zeros, as the reference
# allows; with sd3_medium.safetensors set clip_l_path, clip_g_path (and t5_path).
model_family = "sd3"
model_path = "models/sd3_medium_incl_clips_t5xxlfp16.safetensors"
sd3_variant = "sd3-medium"      # for plans without the file; read from its shapes otherwise
dataset_dir = "data/my_subject"
instance_prompt = "ohwx"

run_name = "sd3_medium_lora"
resolution = 1024
batch_size = 1
network_dim = 16
network_alpha = 16.0
learning_rate = 1e-4
max_train_steps = 2000
lr_warmup_steps = 100
text_encoder_placement = "stream"  # caching: T5 and CLIP layers pass through the GPU two at a time
