"""GSM8K answers in generated text: the final number of a solution (normalised), the numeric match against a
reference, and where a generated solution ends (a new instruction block, or the end of its "####" line)."""
from __future__ import annotations

import math
import re

# A generated solution ends where the model starts a new instruction block of the few-shot prompt.
STOP_STRINGS = ("\n\n### Instruction", "Below is an instruction")
_NUMBER = re.compile(r"(?<![\w.])([-\u2212]?)\$?(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?)")


def _normalise(sign: str, digits: str) -> str:
    """Canonical text of a number: no commas, no leading zeros, no trailing fractional zeros, no "-0"."""
    integer, _, fraction = digits.replace(",", "").partition(".")
    fraction = fraction.rstrip("0")
    text = str(int(integer)) + (f".{fraction}" if fraction else "")
    return f"-{text}" if sign and text != "0" else text


def _numbers(text: str) -> list[str]:
    return [_normalise(sign, digits) for sign, digits in _NUMBER.findall(text)]


def extract_number(text: str) -> str | None:
    """Final answer of a generated GSM8K solution, normalised ("1,234" -> "1234", "5.0" -> "5", "$-3." -> "-3").

    Preference: the first number after the first "####"; else the first number after the last "answer is";
    else the last number in the text; None if the text has no number.
    """
    _, marker, tail = text.partition("####")
    if marker and (found := _numbers(tail)):
        return found[0]
    at = text.lower().rfind("answer is")
    if at >= 0 and (found := _numbers(text[at + len("answer is"):])):
        return found[0]
    found = _numbers(text)
    return found[-1] if found else None


def same_number(predicted: str | None, gold: str) -> bool:
    reference = extract_number(gold)
    if predicted is None or reference is None:
        return False
    return math.isclose(float(predicted), float(reference), rel_tol=0.0, abs_tol=1e-6)


def answer_line_end(text: str) -> int | None:
    """Index of the line break that ends the final-answer line (the line of the first "####") once that line holds
    a number, else None. `extract_number` reads the first number after the first "####" and a number never spans a
    line break, so nothing generated after this line can change the answer: generation may stop there."""
    at = text.find("####")
    end = text.find("\n", at + 4) if at >= 0 else -1
    return end if end >= 0 and _numbers(text[at + 4:end]) else None


def cut_at_stop_strings(text: str) -> str:
    """The generated text up to the first stop string (the start of a new instruction block)."""
    cut = min((i for i in (text.find(s) for s in STOP_STRINGS) if i >= 0), default=len(text))
    return text[:cut]


def truncate_at_stop(text: str) -> str:
    """The generated text up to the first stop string or the end of the final-answer line (`answer_line_end`),
    whichever comes first; the extracted answer is that of the whole text."""
    text = cut_at_stop_strings(text)
    end = answer_line_end(text)
    return text if end is None else text[:end]
