# SD3 Medium LoRA on an 8 GB GPU (RTX 3060 Ti / 3070 / 4060): rank 16, batch 1, 1024 px, from
# the all-in-one file with CLIP-L, CLIP-G and T5-XXL inside: the text encoders and the VAE are
# read from its text_encoders.* and first_stage_model sections (clip_l_path etc. stay empty).
# The base stays bf16 and resident, AdamW, gradient checkpointing; no block swap needed.
#
#   python train.py configs/sd3_medium_lora.py --plan    # training: planned peak 4.79 GiB (fp8 base: 2.93)
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
