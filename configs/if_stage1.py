# DeepFloyd IF stage I LoRA, IF-I-XL (4.3 B) at 64 px, on a 4 GB GPU (GTX 1650, RTX 3050 4 GB
# laptop): rank 32, batch 2 x 2 accumulation steps, lr 4e-5 -> 4e-6 polynomial (SimpleTuner's
# DeepFloyd guide, which needs 22-24 GB). The bf16 UNet is 8 GiB, so it streams: 29 blocks per
# group (25 of 27 down, 29 of 31 up) live in host memory and pass one way (h2d_only: the frozen
# base is never copied back) through 2 device slots each; T5-XXL streams its layers while
# caching; T5 states cached in bf16 (616 KiB a caption). GTX cards have no bf16: add --dtype=fp16
# (the UNet in fp16 with loss scaling, T5 still in bf16; the same 2.51 GiB planned).
#
# Planned peaks, python train.py configs/if_stage1.py --plan (plans: not yet measured on a GPU):
#   plain torch (--kernels=torch): caching 1.07, training 2.51, sampling 2.01, whole run 2.51 GiB
#   Triton kernels (the default):  caching 1.07, training 2.51, sampling 2.01, whole run 2.51 GiB
#   nvidia-smi about 3.2-3.8 GiB; 7.9 GiB of host memory for tensors while training.
#
#   python train.py configs/if_stage1.py --dataset_dir=/path/to/images
#   python sample.py --config configs/if_stage1.py --lora runs/if_stage1_lora/if_stage1_lora.safetensors \
#       --prompt "ohwx, a photo --d 1" --sizes 64,96,64x96 --out samples
#
# Files: the DeepFloyd/IF-I-XL-v1.0 repository (gated: accept the licence) as a folder under
# models/: config.yml + pytorch_model.bin (with allow_pickle = True), or its unet/ folder
# (safetensors); T5 from its text_encoder/ (tokenizer/ beside it). Optionally IF's
# zero_t5-v1_1-xxl_vector.npy as if_unconditional_embedding (else "" is encoded, as diffusers does).
# The LoRA file has diffusers' keys: pipe.load_lora_weights(path) in IFPipeline; ComfyUI has no IF loader.
model_family = "deepfloyd"
model_path = "models/IF-I-XL-v1.0"
t5_path = "models/IF-I-XL-v1.0/text_encoder"
dataset_dir = "data/my_subject"
instance_prompt = "ohwx"

run_name = "if_stage1_lora"
resolution = 64
batch_size = 2
gradient_accumulation_steps = 2
network_dim = 32
network_alpha = 32.0
lora_format = "diffusers"       # for IFPipeline.load_lora_weights (kohya names of IF modules: this trainer only)
max_train_steps = 2000
learning_rate = 4e-5
lr_scheduler = "polynomial"     # 4e-5 -> 4e-6 (lr_end_ratio), linearly (lr_power 1)
lr_end_ratio = 0.1
lr_warmup_steps = 50
caption_dropout_rate = 0.1      # keeps the unconditional prediction CFG (7) samples against
sample_sizes = "64,96,64x96"    # each sample prompt square, larger, and portrait (seed 003)

blocks_to_swap = 29             # the most: 2 blocks of each group stay on the device
swap_mode = "h2d_only"
text_encoder_placement = "stream"  # while caching, T5-XXL (9 GiB in bf16) streams layer by layer
