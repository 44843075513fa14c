"""Haystack text shipped as package data (extracted from r-cran-janeaustenr)."""
import gzip
from importlib import resources

import pytest

from sglang_depthkv.core import haystack
from sglang_depthkv.core.haystack import HaystackError, haystack_text, load_novel, paragraphs

# First sentence of each novel (public-domain text, checked by eye against the Gutenberg editions).
OPENINGS = {
    "emma": "Emma Woodhouse, handsome, clever, and rich, with a comfortable home",
    "persuasion": "Sir Walter Elliot, of Kellynch Hall, in Somersetshire, was a man who,",
    "northanger": "No one who had ever seen Catherine Morland in her infancy would have",
    "pride": "It is a truth universally acknowledged, that a single man in possession",
}


@pytest.mark.parametrize("name", sorted(OPENINGS))
def test_novel_text_is_the_real_book(name):
    text = load_novel(name)
    assert OPENINGS[name] in text
    assert len(text) > 400_000
    assert "\x00" not in text and "\r" not in text


def test_shipped_files_are_small_gzip():
    total = 0
    for name in haystack.NOVELS:
        res = resources.files("sglang_depthkv.data").joinpath(f"austen_{name}.txt.gz")
        raw = res.read_bytes()
        total += len(raw)
        assert raw[:2] == b"\x1f\x8b"
        gzip.decompress(raw)
    assert total <= 1_500_000


def test_calibration_text_is_disjoint_from_haystacks():
    assert not set(haystack.CALIBRATION_NOVELS) & set(haystack.HAYSTACK_NOVELS)
    hay = haystack_text()
    assert OPENINGS["pride"] not in hay
    assert OPENINGS["emma"] in hay and OPENINGS["persuasion"] in hay


def test_paragraphs_fold_lines_and_drop_headings():
    paras = paragraphs("emma")
    assert len(paras) > 1000
    assert all("\n" not in p and len(p) >= 40 for p in paras)
    assert "CHAPTER I" not in paras  # headings are dropped
    assert paras[0].startswith(OPENINGS["emma"])


def test_bad_names_raise():
    with pytest.raises(HaystackError, match="unknown novel 'ulysses'"):
        load_novel("ulysses")
    with pytest.raises(HaystackError, match="single string"):
        haystack_text("emma")
    with pytest.raises(HaystackError, match="no novel"):
        haystack_text([])
