"""Checks before a run: the preflight (data, model, tokenizer, endpoints, trackers, folders, in seconds) and the fit check
(each stage's GPU memory, RAM and disk, predicted from the model's config)."""
