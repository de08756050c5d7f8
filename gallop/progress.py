"""Progress bars that behave in a distributed, Hugging Face-configured world: only rank 0 shows them, and they
follow transformers' switch (``transformers.utils.logging.disable_progress_bar()``) and huggingface_hub's
(``HF_HUB_DISABLE_PROGRESS_BARS=1``)."""

from __future__ import annotations

import os
from typing import Any


def _is_rank_zero() -> bool:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank() == 0
    except Exception:  # a broken distributed setup must not break a progress bar
        pass
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0) == 0


def progress_enabled() -> bool:
    """Whether gallop shows progress bars in this process now."""
    if not _is_rank_zero():
        return False
    try:
        from transformers.utils import logging as hf_logging

        if not hf_logging.is_progress_bar_enabled():
            return False
    except ImportError:  # transformers is a dependency, but gallop's core does not need it
        pass
    try:
        from huggingface_hub.utils import are_progress_bars_disabled

        if are_progress_bars_disabled():
            return False
    except ImportError:
        pass
    return True


def progress_bar(iterable: Any | None = None, *, disable: bool = False, **kwargs):
    """``tqdm.auto.tqdm(iterable, ...)``, off when ``disable`` or when ``progress_enabled()`` says so."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=disable or not progress_enabled(), **kwargs)
