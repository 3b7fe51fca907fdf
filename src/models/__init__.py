"""Model-side code: the offline Qwen tokenizer, the image-only processor, tiny models, loading."""
