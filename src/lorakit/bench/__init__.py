"""Benchmarks against PEFT and bitsandbytes (`lorakit bench`)."""
