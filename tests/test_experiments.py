"""The measurements behind docs/experiments.md: baseline entropy and the bracket checks."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))
from run import ORDER, bracket_check, environment_check, recipe, splice, train_command, unigram_entropy  # noqa: E402


def test_unigram_entropy():
    assert unigram_entropy("aaaa") == 0
    assert unigram_entropy("abab") == pytest.approx(math.log(2))
    assert unigram_entropy("abcd") == pytest.approx(math.log(4))


def test_brackets_in_c_skip_strings_comments_and_char_literals():
    code = 'if (a[i] == \')\') { printf("(%d", x); /* ( */ } // {\n'
    assert bracket_check(code, code=True) == {"matched": 4, "mismatched": 0, "unopened": 0, "open_at_end": 0}
    assert bracket_check("f(x]; }", code=True) == {"matched": 0, "mismatched": 2, "unopened": 0, "open_at_end": 1}
    assert bracket_check("} f(x);", code=True) == {"matched": 1, "mismatched": 0, "unopened": 1, "open_at_end": 0}


def test_brackets_in_latex_ignore_escaped_braces():
    tex = r"\frac{a}{b} \{ x \} $f(x)$ {"
    assert bracket_check(tex, code=False) == {"matched": 3, "mismatched": 0, "unopened": 0, "open_at_end": 1}


def test_environments_match_the_innermost_begin():
    tex = r"\end{lemma} \begin{proof} \begin{enumerate} \item x \end{enumerate} \end{itemize} \end{proof} \begin{x}"
    assert environment_check(tex) == {"matched": 2, "mismatched": 1, "unopened": 1, "open_at_end": 1}


def test_every_recipe_makes_a_train_command():
    for corpus in ORDER:
        argv = train_command(corpus, Path("corpora"), gpu=False)
        r = recipe(corpus)
        assert argv[1:4] == ["-m", "charrnn", "train"]  # the command that sets the allocator variables
        assert argv[argv.index("--data") + 1] == str(Path("corpora") / r["data"])
        assert float(argv[argv.index("--max-minutes") + 1]) <= 60  # the CPU budget
        assert "True" not in argv and "False" not in argv  # switches are flags
        gpu = train_command(corpus, Path("corpora"), gpu=True)
        assert gpu[gpu.index("--name") + 1] == r["name"]


def test_the_bundled_recipe_passes_its_switches_as_flags():
    argv = train_command("shakespeare", Path("corpora"), gpu=False)
    assert "--locked-dropout" in argv and argv[argv.index("--weight-drop") + 1] == "0.25"


def test_doc_for_one_corpus_keeps_the_other_rows_and_sections():
    old = "\n".join(["# page", "| corpus | loss |", "| shakespeare | 1.467 |", "| linux | 1.251 |", "",
                     "## Held-out loss, three ways", "old protocol text", "| linux | 1.305 windows |", "",
                     "## shakespeare", "old shakespeare", "### Samples during training", "old samples",
                     "## linux", "linux section", "### Temperature", "kept"]) + "\n"
    new = "\n".join(["# page", "| corpus | loss |", "| shakespeare | 1.433 |", "| linux | not measured | |", "",
                     "## Held-out loss, three ways", "new protocol text", "| linux | 1.306 windows |", "",
                     "## shakespeare", "new shakespeare"]) + "\n"
    merged = splice(old, new, "shakespeare")
    assert "| shakespeare | 1.433 |" in merged and "| linux | 1.251 |" in merged
    assert "not measured" not in merged and "1.467" not in merged
    # the summary row is the old one, the protocols row the new one
    assert merged.count("| linux | 1.251 |") == 1 and "| linux | 1.306 windows |" in merged
    assert "new protocol text" in merged and "old protocol text" not in merged
    assert "new shakespeare" in merged and "old shakespeare" not in merged and "old samples" not in merged
    assert merged.index("new shakespeare") < merged.index("## linux") < merged.index("kept")
