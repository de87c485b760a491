# Voice Studio on CPU.
#   docker build -t voice-studio .
#   docker run -p 7860:7860 -v voice-studio-models:/app/models_cache voice-studio
# Converted models (and Hugging Face downloads) live in the volume, so they are made once; the
# bundled Whisper model is converted at build time, so even a fresh container starts warm.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GRADIO_ANALYTICS_ENABLED=False \
    VOICE_STUDIO_MODELS_DIR=/app/models_cache \
    HF_HOME=/app/models_cache/huggingface \
    PYTHONPATH=/app

# ffmpeg for video work (burned-in and muxed subtitles, probing uploads); wget for KubeRay's health probes
# when the image runs Ray nodes (deploy/README.md). PYTHONPATH: Ray workers import the app's packages.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ffmpeg wget \
    && rm -rf /var/lib/apt/lists/*

# An unprivileged user (uid 1000, as Hugging Face Docker Spaces expect).
RUN groupadd --gid 1000 voice && useradd --create-home --uid 1000 --gid 1000 voice
WORKDIR /app

# Dependencies first, so code changes reuse this layer. torch comes from PyTorch's CPU index:
# PyPI's default Linux build carries CUDA libraries (several GB) that a CPU image never uses.
COPY requirements.txt .
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu -r requirements.txt

COPY --chown=voice:voice . .
RUN mkdir -p /app/models_cache && chown voice:voice /app/models_cache

USER 1000:1000
# Convert the bundled default Whisper model into the models folder now, as the app user, so that no
# first request waits for it (about 35 s). Before VOLUME: a new named volume starts with this content.
RUN python app.py --prepare

VOLUME ["/app/models_cache"]
EXPOSE 7860
CMD ["python", "app.py", "--host", "0.0.0.0"]
