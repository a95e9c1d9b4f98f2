"""Training, search and post-training quantization loops, and the run folder they write."""
