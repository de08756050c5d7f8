"""Progress bars (gallop.progress): rank 0 only, off when transformers' or huggingface_hub's switch is off."""

import pytest

from gallop.progress import progress_bar, progress_enabled


@pytest.fixture
def rank_zero(monkeypatch):
    """A single process with every progress-bar switch on (and put back as it was afterwards)."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    for name in ("RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    hub_was_off, hf_was_on = are_progress_bars_disabled(), hf_logging.is_progress_bar_enabled()
    enable_progress_bars()
    hf_logging.enable_progress_bar()
    yield
    (disable_progress_bars if hub_was_off else enable_progress_bars)()
    (hf_logging.enable_progress_bar if hf_was_on else hf_logging.disable_progress_bar)()


def test_on_for_rank_zero(rank_zero):
    assert progress_enabled()
    bar = progress_bar(range(3))
    assert not bar.disable and list(bar) == [0, 1, 2]
    assert progress_bar(range(3), disable=True).disable


@pytest.mark.parametrize("variable", ["RANK", "LOCAL_RANK"])
def test_off_on_other_ranks(rank_zero, monkeypatch, variable):
    monkeypatch.setenv(variable, "1")
    assert not progress_enabled()
    bar = progress_bar(range(3))
    assert bar.disable and list(bar) == [0, 1, 2]  # still iterates, silently


def test_off_when_transformers_or_the_hub_turns_them_off(rank_zero):
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    assert not progress_enabled()
    hf_logging.enable_progress_bar()
    disable_progress_bars()
    assert not progress_enabled()
    enable_progress_bars()
    assert progress_enabled()
