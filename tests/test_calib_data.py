"""The evaluation texts (benchmarks/data) never reach calibration: no passage of them is in the converter's
built-in calibration material, and the converter reads no file of its own accord."""

from __future__ import annotations

import pathlib
import re
import tokenize

from converters import calib_data
from converters.convert import ConvertOptions

ROOT = pathlib.Path(__file__).parent.parent
EVAL_TEXTS = sorted((ROOT / "benchmarks" / "data").glob("*.txt"))
SHINGLE = 8          # words: long enough that no two independently written passages share one by chance


def shingles(text: str) -> set[tuple[str, ...]]:
    words = re.findall(r"[a-z0-9']+", text.lower())
    return {tuple(words[i:i + SHINGLE]) for i in range(len(words) - SHINGLE + 1)}


def test_no_evaluation_passage_is_in_the_calibration_data():
    calibration = set().union(*(shingles(t) for t in calib_data.CALIBRATION_TEXTS + calib_data.CHAT_PROMPTS))
    assert len(calibration) > 4000
    names = {p.name for p in EVAL_TEXTS}
    assert {"unseen_legal.txt", "unseen_screenplay.txt", "unseen_poetry.txt", "unseen_manual.txt",
            "prose_heldout.txt"} <= names
    for path in EVAL_TEXTS:
        own = shingles(path.read_text(encoding="utf-8"))
        assert len(own) > 500, path.name
        shared = own & calibration
        assert not shared, f"{path.name} shares {len(shared)} passages with calib_data, e.g. {' '.join(min(shared))}"


def test_the_shingle_check_would_catch_a_leak():
    leaked = EVAL_TEXTS[0].read_text(encoding="utf-8")[:400]
    assert shingles(leaked) & shingles("Intro. " + leaked + " Outro.")


def test_converter_reads_only_the_files_it_is_given():
    """No string in the converter's code names an evaluation text (comments may cite them as measurements)."""
    assert ConvertOptions().calib_files == ()
    n_strings = 0
    for src in (ROOT / "converters").glob("*.py"):
        with open(src, encoding="utf-8") as f:
            strings = [t.string for t in tokenize.generate_tokens(f.readline) if t.type == tokenize.STRING]
        n_strings += len(strings)
        for s in strings:
            assert "benchmarks" not in s and not any(p.stem in s for p in EVAL_TEXTS), (src.name, s[:80])
    assert n_strings > 100
