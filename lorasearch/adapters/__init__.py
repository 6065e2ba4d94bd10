"""Readers for LoRA adapter files (PEFT, diffusers, kohya) and writers for tests and collections."""
