"""The teacher LLM that writes (01) and judges (04, rounds) rows: a local model or an OpenAI-compatible endpoint, whose
client also serves 04's API baseline rows."""
