"""Model building: small Qwen2-architecture checkpoints from scratch, their pretraining and report, the
offline Qwen2.5 tokenizer, and GGUF / HF conversion.
"""
