"""The probe family: frozen-encoder embeddings (timm or a VLM's tower / language model) and a
logistic-regression head per fold; the embeddings are saved with the run for fusion."""
