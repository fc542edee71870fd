"""Sharing a finished run: its models uploaded to the Hugging Face Hub with their cards (`python -m tunebook push`)."""
