"""The models: the base model loaded (embedded, hub id or folder) with its backend and dtype, what differs between model
families, the tokenizer's round trip, batched generation, the adapter merged into the base model, and the patches to
third-party internals."""
