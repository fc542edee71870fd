"""Stage 02, notebooks/02_finetune.ipynb: LoRA supervised fine-tuning with the loss on the answer tokens only, then
the adapter saved and merged."""
