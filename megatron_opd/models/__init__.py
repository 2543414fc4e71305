"""Models: Megatron-Core GPT builds, Hugging Face conversion, tokenizers, attention."""
