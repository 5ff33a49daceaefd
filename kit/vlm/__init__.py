"""The vlm family: Hugging Face vision-language models (Qwen2.5-VL, LLaVA, ...) as LoRA-tuned classifiers.

Imported only when a vlm run needs it (kit.train.families); transformers, peft and bitsandbytes are
imported inside the functions that use them, never at `import kit`.
"""
