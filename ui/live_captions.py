"""The Speech tab's Live mode: captions from the microphone while the user speaks.

The browser streams the microphone (``gr.Audio(streaming=True)``: Gradio's recorder sends a chunk every
0.1 s); each chunk goes to the page's own :class:`~pipelines.speech.live_stream.LiveStream` (in
``gr.State``: no stream lives in a global), which takes it at once and decodes on a worker thread. The
handler never waits for the decoder: Gradio keeps only the newest chunk of a busy handler, so a handler
that waited would lose audio (measured: waiting up to 0.4 s lost a fifth of it). A decode's captions go
out with the next chunk, within 0.1 s of its end. Confirmed text is shown plain, the tentative tail grey
and slanted. On stop the recording is transcribed as a file: the text, the segments and the
SRT/VTT/TXT/JSON downloads are the same as for an upload.

Programs use the WebSocket route instead (:mod:`ui.live_route`); these events are not in the named API.
"""
from __future__ import annotations

import html
from typing import Optional

import gradio as gr

from pipelines.services import Services
from pipelines.speech.live_stream import LIVE_PRECISION, Captions, LiveStream, live_config
from pipelines.subtitles.cues import CueRules
from pipelines.subtitles.formats import write_outputs

from .common import (language_dropdown, precision_radio, progress_fn, request_dir, task_radio, user_errors,
                     whisper_model_dropdown, device_dropdown, whisper_request)

STREAM_EVERY = 0.1  # seconds of audio per chunk (what Gradio's microphone recorder sends)
CAPTION_STYLE = ("<style>#live-captions .live-box{font-size:1.15em;line-height:1.5;min-height:4em}"
                 "#live-captions .live-tentative{color:#888;font-style:italic}"
                 "#live-captions .live-status{color:#b45309;font-size:0.9em;margin-top:0.4em}</style>")


def render(captions: Optional[Captions]) -> str:
    """The captions as HTML: confirmed text plain, the tentative tail grey and slanted, then the status."""
    if captions is None:
        return CAPTION_STYLE + "<div class='live-box'><span class='live-hint'>Press record and speak.</span></div>"
    status = f"<div class='live-status'>{html.escape(captions.message)}</div>" if captions.message else ""
    return (f"{CAPTION_STYLE}<div class='live-box'><span class='live-confirmed'>{html.escape(captions.confirmed)}"
            f"</span> <span class='live-tentative'>{html.escape(captions.tentative)}</span>{status}</div>")


def _open(services: Services, model, precision, device, task, language) -> LiveStream:
    choice, options = whisper_request(services.settings, model, precision, device, task, language)
    return services.live.open(choice, live_config(options.task, options.language), request_dir("live"))


def make_live_handlers(services: Services):
    """(on_chunk, on_stop, on_start): the handlers of the Live mode's stream, stop and record events."""

    def on_chunk(chunk, stream: Optional[LiveStream], model=None, precision=None, device=None, task=None,
                 language=None) -> tuple[Optional[LiveStream], str]:
        """One chunk (rate, samples) of the microphone: returns the stream and its captions as HTML."""
        with user_errors():
            if stream is None or stream.captions().status == "finished":
                stream = _open(services, model, precision, device, task, language)
        if chunk is not None:
            rate, samples = chunk
            stream.push(samples, int(rate))
        captions = stream.captions()
        if captions.status == "error":
            stream.close()
            raise gr.Error(captions.message)
        return stream, render(captions)

    def on_stop(stream: Optional[LiveStream], progress: gr.Progress = gr.Progress()):
        """The end of the recording: the whole text (the recording transcribed as a file), its language,
        the segments and the download files."""
        if stream is None:
            return None, render(None), "", "", [], []
        with user_errors():
            transcript = stream.finish(refine=True, progress=progress_fn(progress))
        files = write_outputs(transcript, stream.folder, "live", CueRules())
        segments = [[f"{s.start:.2f}", f"{s.end:.2f}", s.text] for s in transcript.segments]
        captions = Captions(transcript.text, "", transcript.language, transcript.duration, 0.0, "finished", "")
        return (None, render(captions), transcript.text, transcript.language or "", segments,
                [str(files[k]) for k in ("srt", "vtt", "txt", "json")])

    def on_start(stream: Optional[LiveStream]):
        """A new recording: the previous stream (if it was never stopped) goes, and so do its results."""
        if stream is not None:
            stream.close()
        return None, render(None), "", "", [], []

    return on_chunk, on_stop, on_start


def build_live_captions(services: Services) -> None:
    """The Live mode: its own microphone, pickers, captions and results (inside the Speech tab)."""
    settings = services.settings
    with gr.Accordion("Live captions: transcribe or translate while you speak", open=False, elem_id="live-mode"):
        with gr.Row():
            with gr.Column():
                mic = gr.Audio(sources=["microphone"], streaming=True, type="numpy", label="Speak", elem_id="live-mic")
                with gr.Row():
                    model = whisper_model_dropdown(settings.default_model, settings.allow_local_models)
                    precision = precision_radio(info="INT8 by default here: the same words, shorter delays.",
                                                value=LIVE_PRECISION)
                    device = device_dropdown(settings.default_device)
                with gr.Row():
                    task, language = task_radio(), language_dropdown()
            with gr.Column():
                captions = gr.HTML(render(None), label="Captions", elem_id="live-captions")
                text = gr.Textbox(label="Whole text (when you stop)", lines=5, buttons=["copy"], elem_id="live-text")
                detected = gr.Textbox(label="Detected language", elem_id="live-language")
                segments = gr.Dataframe(headers=["start", "end", "text"], label="Segments", wrap=True,
                                        interactive=False)
                files = gr.File(label="Downloads (SRT, WebVTT, TXT, JSON)", file_count="multiple", elem_id="live-files")
    stream = gr.State(None, delete_callback=lambda s: s.close() if s is not None else None)
    on_chunk, on_stop, on_start = make_live_handlers(services)
    results = [stream, captions, text, detected, segments, files]
    mic.start_recording(on_start, inputs=[stream], outputs=results, api_visibility="private", queue=False)
    mic.stream(on_chunk, inputs=[mic, stream, model, precision, device, task, language], outputs=[stream, captions],
               stream_every=STREAM_EVERY, time_limit=int(settings.max_audio_seconds) + 60, show_progress="hidden",
               api_visibility="private", concurrency_id="live", concurrency_limit=settings.queue_limit("live"))
    mic.stop_recording(on_stop, inputs=[stream], outputs=results, api_visibility="private",
                       concurrency_id="whisper", concurrency_limit=settings.queue_limit("whisper"))
