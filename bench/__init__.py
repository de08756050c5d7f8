"""Benchmarks: scripts that time gallop against the torch, LoRA and full fine-tuning baselines (see each file)."""
