"""Gradio tabs. They receive services and never load a model themselves."""
