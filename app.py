"""Voice Studio: Whisper and Stable Diffusion + ControlNet on OpenVINO, in one Gradio app.

    python app.py            # serves http://127.0.0.1:7860
    python app.py --help     # flags

Importing this module does no work: flags are parsed, services built and the UI made only in main().
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Optional, Sequence

ENV_PREFIX = "VOICE_STUDIO_"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(
        prog="app.py",
        description="Voice Studio: speech to text, video to subtitles and voice to pose-guided image, on OpenVINO.",
    )
    parser.add_argument("--host", default=env(f"{ENV_PREFIX}HOST", "127.0.0.1"),
                        help="address to listen on (default 127.0.0.1; 0.0.0.0 to serve the network)")
    parser.add_argument("--port", type=int, default=int(env(f"{ENV_PREFIX}PORT", env("GRADIO_SERVER_PORT", "7860"))),
                        help="port (default 7860)")
    parser.add_argument("--share", action="store_true", help="also open a public Gradio share link")
    parser.add_argument("--models-dir", type=Path, default=Path(env(f"{ENV_PREFIX}MODELS_DIR", "models_cache")),
                        help="where converted OpenVINO models are cached (env VOICE_STUDIO_MODELS_DIR)")
    parser.add_argument("--device", default=env(f"{ENV_PREFIX}DEVICE", "CPU"),
                        help="default OpenVINO device: CPU, GPU, NPU or AUTO (default CPU)")
    parser.add_argument("--model", default=env(f"{ENV_PREFIX}MODEL", None),
                        help="default Whisper model: a listed id, a Hugging Face id or a local folder "
                             "(default: the bundled multilingual whisper-base)")
    parser.add_argument("--max-loaded-models", type=int, default=2,
                        help="Whisper models kept loaded at once (default 2)")
    return parser.parse_args(argv)


def build_app(services):
    """The Gradio Blocks app over ready services (no model is loaded here)."""
    import gradio as gr

    from ui.speech_tab import build_speech_tab
    from ui.subtitles_tab import build_subtitles_tab

    with gr.Blocks(title="Voice Studio") as demo:
        gr.Markdown("# Voice Studio\nWhisper and Stable Diffusion on OpenVINO, fast on an ordinary CPU.")
        with gr.Tabs():
            with gr.Tab("Speech to text", id="speech"):
                build_speech_tab(services)
            with gr.Tab("Video to subtitles", id="subtitles"):
                build_subtitles_tab(services)
    demo.queue(default_concurrency_limit=1, max_size=64)
    return demo


def make_services(args: argparse.Namespace):
    from pipelines.devices import default_device
    from pipelines.services import Services, Settings
    from pipelines.whisper_models import DEFAULT_MODEL

    settings = Settings(
        models_dir=args.models_dir,
        default_model=args.model or DEFAULT_MODEL,
        default_device=args.device or default_device(),
        max_loaded_whisper=args.max_loaded_models,
    )
    return Services(settings)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    demo = build_app(make_services(args))
    demo.launch(server_name=args.host, server_port=args.port, share=args.share)


if __name__ == "__main__":
    main()
