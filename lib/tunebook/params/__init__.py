"""The params: the schema of every knob (its default, the stage that first reads it, its meaning), reading a params
YAML with its overrides into it, the messages for a wrong one, and the reference table generated from it."""
