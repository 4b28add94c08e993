"""Defaults of the evaluation that callers read without importing torch (the command line's help)."""

#: Held-out images whose shifted copies the risk model also sees (x 87 sets: 17,400 images).
DEFAULT_SHIFT_SAMPLES = 200
