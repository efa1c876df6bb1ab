# DeepFloyd IF stage II LoRA, IF-II-L (1.2 B): 64 -> 256 px super-resolution, on a 4 GB GPU: rank 32,
# batch 1 x 4 accumulation steps (batch 4 at 256 px plans 5.6 GiB), lr 4e-5 -> 4e-6 polynomial.
# 32 blocks per group stream from host memory one way (h2d_only); without the swap
# (--blocks_to_swap=0) it plans 3.30 GiB and runs faster on a 6 GB GPU. Each training image is
# shrunk 4x into the low-resolution input, upsampled back and noised at an augmentation level
# drawn uniformly per sample (if_aug_levels, as the original's SuperResUNetModel draws).
#
# Planned peaks, python train.py configs/if_stage2.py --plan (plans: not yet measured on a GPU):
#   plain torch (--kernels=torch): caching 1.07, training 1.80, sampling 1.23, whole run 1.80 GiB
#   Triton kernels (the default):  caching 1.07, training 1.80, sampling 1.23, whole run 1.80 GiB
#   nvidia-smi about 2.4-3.0 GiB; 2.2 GiB of host memory for tensors while training.
#
#   python train.py configs/if_stage2.py --dataset_dir=/path/to/images
#   python sample.py --config configs/if_stage2.py --lora runs/if_stage2_lora/if_stage2_lora.safetensors \
#       --base_model models/IF-I-XL-v1.0 --prompt "ohwx, a photo --d 1" --out cascade.png   # stage I, then II
#
# Files: the DeepFloyd/IF-II-L-v1.0 repository folder under models/ (config.yml + pytorch_model.bin
# with allow_pickle = True, or its unet/ folder); T5 from any IF repository's text_encoder/.
# Samples during training upscale if_sample_low_res (default: the dataset's first image).
model_family = "deepfloyd"
model_path = "models/IF-II-L-v1.0"
t5_path = "models/IF-I-XL-v1.0/text_encoder"
dataset_dir = "data/my_subject"
instance_prompt = "ohwx"

run_name = "if_stage2_lora"
resolution = 256
batch_size = 1
gradient_accumulation_steps = 4
network_dim = 32
network_alpha = 32.0
lora_format = "diffusers"       # for IFPipeline.load_lora_weights (kohya names of IF modules: this trainer only)
max_train_steps = 2000
learning_rate = 4e-5
lr_scheduler = "polynomial"
lr_end_ratio = 0.1
lr_warmup_steps = 50
caption_dropout_rate = 0.1

blocks_to_swap = 32             # the most: 2 blocks of each group stay on the device
swap_mode = "h2d_only"
text_encoder_placement = "stream"  # while caching, T5-XXL (9 GiB in bf16) streams layer by layer
