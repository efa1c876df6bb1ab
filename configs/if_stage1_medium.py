# DeepFloyd IF stage I LoRA, IF-I-M (the 400 M base model SimpleTuner's guide trains) at 64 px on a
# 4 GB GPU: rank 32, batch 4, lr 4e-5 -> 4e-6 polynomial, no block swap; T5-XXL streams its layers
# while caching. The plan uses ESTIMATED shapes (model_channels 192 on the IF-I-XL template: 372 M
# against the published 400 M) until the folder is at model_path; then it reads the real config.yml.
#
# Planned peaks, python train.py configs/if_stage1_medium.py --plan (estimated shapes; not measured):
#   plain torch (--kernels=torch): caching 1.07, training 1.03, sampling 0.79, whole run 1.07 GiB
#   Triton kernels (the default):  caching 1.07, training 1.03, sampling 0.79, whole run 1.07 GiB
#   nvidia-smi about 1.7-2.2 GiB.
#
#   python train.py configs/if_stage1_medium.py --dataset_dir=/path/to/images
#
# Files: the DeepFloyd/IF-I-M-v1.0 repository folder under models/ (config.yml + pytorch_model.bin
# with allow_pickle = True, or its unet/ folder); T5 from its text_encoder/.
model_family = "deepfloyd"
model_path = "models/IF-I-M-v1.0"
t5_path = "models/IF-I-M-v1.0/text_encoder"
dataset_dir = "data/my_subject"
instance_prompt = "ohwx"

run_name = "if_stage1_medium_lora"
resolution = 64
batch_size = 4
network_dim = 32
network_alpha = 32.0
lora_format = "diffusers"       # for IFPipeline.load_lora_weights (kohya names of IF modules: this trainer only)
max_train_steps = 2000
learning_rate = 4e-5
lr_scheduler = "polynomial"
lr_end_ratio = 0.1
lr_warmup_steps = 50
caption_dropout_rate = 0.1
sample_sizes = "64,96,64x96"
text_encoder_placement = "stream"  # while caching, T5-XXL (9 GiB in bf16) streams layer by layer
