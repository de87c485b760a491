"""Model and media work for Voice Studio. Nothing here imports gradio."""
