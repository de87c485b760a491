"""The errors every domain shares, written for the user: what is wrong and what to do.

The UI shows these messages as they are (``ui.common.user_errors``); anything else is a bug and is
reported as one.
"""
from __future__ import annotations

import errno


class ModelUnavailable(Exception):
    """A model cannot be had: not cached, not downloadable, not a model of the right kind, or unusable.
    The message says which model and how to provide it."""


class DiskFull(OSError):
    """The disk ran out of space while getting or converting a model; the message says where to free some."""


class Refused(ValueError):
    """A request this server or model does not serve as asked (e.g. translate with an English-only
    model, a local path on a shared server); the message says what to do instead."""


def is_disk_full(error: BaseException | None) -> bool:
    """Whether ``error`` says the disk is full: an errno, or only the message (hf_xet's Rust errors)."""
    if error is None:
        return False
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error).lower()
    return "no space left on device" in text or "os error 28" in text or "disk quota exceeded" in text


def unavailable(ref: str, what: str, how: str, error: BaseException | None = None) -> ModelUnavailable:
    """The error for a model that cannot be had (to raise); a full disk is raised as :class:`DiskFull`
    at once, since advice about downloading the model would not help."""
    if is_disk_full(error):
        raise DiskFull(errno.ENOSPC, f"The disk is full: {what} '{ref}' could not be downloaded ({error}). Free "
                       "some space in the Hugging Face cache (HF_HOME) or the models folder and try again.") from error
    detail = f" ({type(error).__name__}: {error})" if error is not None else ""
    return ModelUnavailable(f"{what} '{ref}' is not available{detail}. {how}")


class ServiceUnavailable(Exception):
    """The workers that run models (Ray Serve replicas) cannot take or finish a request now: all are
    busy with a full queue, or the one running it stopped (killed, out of memory) and a second try did
    not finish either. The message says what happened and to try again."""
