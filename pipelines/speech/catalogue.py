"""The Whisper family the product offers, and what each model can do."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

BUNDLED_BASE = "bundled/whisper-base"
BUNDLED_TINY_EN = "bundled/whisper-tiny.en"
DEFAULT_MODEL = BUNDLED_BASE
#: A Whisper model on the Hugging Face Hub that messages give as an example.
HUB_EXAMPLE = "openai/whisper-small"
#: How INT8 Whisper is made (``VOICE_STUDIO_WHISPER_INT8``): ``decoder-weights`` (default, chosen by
#: measurement on this CPU) or ``calibrated`` (NNCF post-training quantization of the encoder,
#: calibrated on speech, beside the INT8-weight decoder; for CPUs where INT8 activations pay).
ENV_INT8_METHOD = "VOICE_STUDIO_WHISPER_INT8"
INT8_METHODS = ("decoder-weights", "calibrated")


@dataclass(frozen=True)
class WhisperModelInfo:
    id: str
    label: str
    multilingual: bool = True
    can_translate: bool = True


def _hub(id_: str, label: str, multilingual: bool = True, can_translate: Optional[bool] = None) -> WhisperModelInfo:
    return WhisperModelInfo(id_, label, multilingual, multilingual if can_translate is None else can_translate)


CATALOGUE: tuple[WhisperModelInfo, ...] = (
    WhisperModelInfo(BUNDLED_BASE, "Whisper base, multilingual (bundled, works offline)"),
    WhisperModelInfo(BUNDLED_TINY_EN, "Whisper tiny.en, English only (bundled, works offline)", False, False),
    _hub("openai/whisper-tiny", "openai/whisper-tiny"),
    _hub("openai/whisper-tiny.en", "openai/whisper-tiny.en", multilingual=False),
    _hub("openai/whisper-base", "openai/whisper-base"),
    _hub("openai/whisper-base.en", "openai/whisper-base.en", multilingual=False),
    _hub("openai/whisper-small", "openai/whisper-small"),
    _hub("openai/whisper-small.en", "openai/whisper-small.en", multilingual=False),
    _hub("openai/whisper-medium", "openai/whisper-medium"),
    _hub("openai/whisper-medium.en", "openai/whisper-medium.en", multilingual=False),
    _hub("openai/whisper-large-v2", "openai/whisper-large-v2"),
    _hub("openai/whisper-large-v3", "openai/whisper-large-v3"),
    # large-v3-turbo was fine-tuned on transcription only: its translations are unreliable.
    _hub("openai/whisper-large-v3-turbo", "openai/whisper-large-v3-turbo", can_translate=False),
    _hub("distil-whisper/distil-small.en", "distil-whisper/distil-small.en", multilingual=False),
    _hub("distil-whisper/distil-medium.en", "distil-whisper/distil-medium.en", multilingual=False),
    # distil-large-v2/v3 are trained for English transcription only.
    _hub("distil-whisper/distil-large-v2", "distil-whisper/distil-large-v2", can_translate=False),
    _hub("distil-whisper/distil-large-v3", "distil-whisper/distil-large-v3", can_translate=False),
)

_BY_ID = {m.id: m for m in CATALOGUE}


def model_info(model: str) -> Optional[WhisperModelInfo]:
    """Catalogue entry for a model id, or None for a model outside the catalogue (local folder)."""
    return _BY_ID.get(model)


def translation_refusal(model: str, multilingual: Optional[bool] = None) -> Optional[str]:
    """Why ``model`` cannot translate to English, or None when it can.

    ``multilingual`` is what the loaded model itself says (from its generation config); it decides
    for models outside the catalogue.
    """
    info = model_info(model)
    if info is not None and not info.can_translate:
        if not info.multilingual:
            return (f"{model} is an English-only model and cannot translate. Choose a multilingual "
                    f"model such as {BUNDLED_BASE} or openai/whisper-small, or pick the task 'transcribe'.")
        return (f"{model} was trained for transcription only and does not translate reliably. "
                f"Choose a multilingual model such as {BUNDLED_BASE} or openai/whisper-large-v3.")
    if info is None and multilingual is False:
        return (f"The model at {model} is English-only and cannot translate. Choose a multilingual "
                "model, or pick the task 'transcribe'.")
    return None


# Whisper's languages (code -> name), in the order of its tokenizer.
LANGUAGES: dict[str, str] = {
    "en": "english", "zh": "chinese", "de": "german", "es": "spanish", "ru": "russian", "ko": "korean",
    "fr": "french", "ja": "japanese", "pt": "portuguese", "tr": "turkish", "pl": "polish", "ca": "catalan",
    "nl": "dutch", "ar": "arabic", "sv": "swedish", "it": "italian", "id": "indonesian", "hi": "hindi",
    "fi": "finnish", "vi": "vietnamese", "he": "hebrew", "uk": "ukrainian", "el": "greek", "ms": "malay",
    "cs": "czech", "ro": "romanian", "da": "danish", "hu": "hungarian", "ta": "tamil", "no": "norwegian",
    "th": "thai", "ur": "urdu", "hr": "croatian", "bg": "bulgarian", "lt": "lithuanian", "la": "latin",
    "mi": "maori", "ml": "malayalam", "cy": "welsh", "sk": "slovak", "te": "telugu", "fa": "persian",
    "lv": "latvian", "bn": "bengali", "sr": "serbian", "az": "azerbaijani", "sl": "slovenian",
    "kn": "kannada", "et": "estonian", "mk": "macedonian", "br": "breton", "eu": "basque",
    "is": "icelandic", "hy": "armenian", "ne": "nepali", "mn": "mongolian", "bs": "bosnian",
    "kk": "kazakh", "sq": "albanian", "sw": "swahili", "gl": "galician", "mr": "marathi",
    "pa": "punjabi", "si": "sinhala", "km": "khmer", "sn": "shona", "yo": "yoruba", "so": "somali",
    "af": "afrikaans", "oc": "occitan", "ka": "georgian", "be": "belarusian", "tg": "tajik",
    "sd": "sindhi", "gu": "gujarati", "am": "amharic", "yi": "yiddish", "lo": "lao", "uz": "uzbek",
    "fo": "faroese", "ht": "haitian creole", "ps": "pashto", "tk": "turkmen", "nn": "nynorsk",
    "mt": "maltese", "sa": "sanskrit", "lb": "luxembourgish", "my": "myanmar", "bo": "tibetan",
    "tl": "tagalog", "mg": "malagasy", "as": "assamese", "tt": "tatar", "haw": "hawaiian",
    "ln": "lingala", "ha": "hausa", "ba": "bashkir", "jw": "javanese", "su": "sundanese", "yue": "cantonese",
}
