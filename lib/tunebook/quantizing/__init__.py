"""Stage 03, notebooks/03_quantize.ipynb: the quantized copies of the merged fine-tuned model, and an Ollama Modelfile
beside each GGUF copy."""
