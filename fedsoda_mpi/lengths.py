"""Bounded input lengths: every text a run tokenizes fits a fixed number of tokens, whatever the data files hold.

- Training examples (`fit_rows`, then `data.tokenize_sft`) fit data.max_len; the prompts of SST-2 / BoolQ
  evaluation and GSM8K's k shots fit eval.max_len the same way: the row's text (the SST-2 sentence, the BoolQ /
  GSM8K question) is cut from the left, the prompt template and the answer stay whole, so the label word stays
  inside the window and a question keeps its end. The room kept for a label task's answer is its longest label
  word, whatever the row's label, so a prompt's length says nothing of its label.
- A GSM8K question to generate from fits eval.max_len on its own (`fit_rows(prompt_only=True)`); with k shots a
  prompt holds at most (k + 1) x eval.max_len tokens, plus eval.max_new_tokens generated.
- Public texts (SGP, alignment, KL) are cut to data.public_max_len by `data.tokenize_public` (`n_longer` counts them).

A batch therefore holds at most batch size x its limit tokens, never the longest row. `truncation_counts` gives
the numbers a run logs once and records in run.h5 (/truncated); `check_max_len` refuses a data.max_len or
eval.max_len that cannot hold the template, some text and the answer.
"""
from __future__ import annotations

from .data import prompt_and_answer
from .tasks import empty_row, is_generation, label_words, text_key

MIN_TEXT_TOKENS = 8  # data.max_len must leave a row's text at least this many tokens beside template and answer


def _n_tokens(tokenizer, text: str, special: bool) -> int:
    return len(tokenizer(text, add_special_tokens=special)["input_ids"])


def answer_room(tokenizer, task: str, row: dict | None = None) -> int:
    """Tokens a row's answer takes after its prompt in a training example (+ eos): on SST-2 / BoolQ the longest
    label word of the task, whatever the row's label (so a prompt is cut the same way for training and evaluation
    and its length says nothing of the label); on GSM8K the row's solution (MIN_TEXT_TOKENS without a row)."""
    if words := label_words(task):
        return 1 + max(_n_tokens(tokenizer, " " + w, False) for w in words)
    return 1 + (MIN_TEXT_TOKENS if row is None else _n_tokens(tokenizer, prompt_and_answer(task, row)[1], False))


def _keep_last_tokens(tokenizer, text: str, keep: int) -> str:
    """The end of `text` that tokenizes to about its last `keep` tokens ("" for keep <= 0), cut at a token start."""
    if keep <= 0:
        return ""
    if not getattr(tokenizer, "is_fast", False):  # no offsets: decode the kept tokens
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return text if len(ids) <= keep else tokenizer.decode(ids[-keep:])
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if len(enc["input_ids"]) <= keep:
        return text
    return text[enc["offset_mapping"][len(enc["input_ids"]) - keep][0]:]


def _keep_first_tokens(tokenizer, text: str, keep: int) -> str:
    """The start of `text` that tokenizes to about its first `keep` tokens, cut at a token end."""
    if not getattr(tokenizer, "is_fast", False):  # no offsets: decode the kept tokens
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return text if len(ids) <= keep else tokenizer.decode(ids[:max(keep, 1)])
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return text if len(enc["input_ids"]) <= keep else text[:enc["offset_mapping"][max(keep, 1) - 1][1]]


def fit_prompt(tokenizer, task: str, row: dict, budget: int) -> tuple[dict, bool]:
    """`row`, or a copy whose text (SST-2 sentence, BoolQ / GSM8K question) is cut from the left so that its prompt
    (`prompt_and_answer`, with the tokens the tokenizer adds) takes at most `budget` tokens; and whether it was cut.
    The template stays whole and the end of the text, next to the answer, is kept. A budget the template alone
    exceeds leaves the text empty (`check_max_len` refuses such a data.max_len)."""
    n = _n_tokens(tokenizer, prompt_and_answer(task, row)[0], True)
    if n <= budget:
        return row, False
    key = text_key(task)
    text = row[key]
    keep = _n_tokens(tokenizer, text, False) - (n - budget)
    for _ in range(4):  # the tokens at the cut and the template's seams may merge differently: a few corrections
        text = _keep_last_tokens(tokenizer, text, keep)
        n = _n_tokens(tokenizer, prompt_and_answer(task, {**row, key: text})[0], True)
        if n <= budget or not text:
            break
        keep -= n - budget
    else:
        text = ""
    return {**row, key: text}, True


def fit_example(tokenizer, task: str, row: dict, max_len: int, room: int | None = None) -> tuple[dict, bool]:
    """`row` fitted into a training example of `max_len` tokens (prompt + answer + eos), and whether it was cut:
    the text is cut from the left (`fit_prompt`) to leave room for the answer (`answer_room`, or `room` if given);
    a GSM8K solution longer than the window beside the template is itself cut on the right (the question is then
    empty). The same rows give GSM8K's k shots."""
    room = answer_room(tokenizer, task, row) if room is None else room
    if _n_tokens(tokenizer, prompt_and_answer(task, row)[0], True) + room <= max_len:
        return row, False
    if is_generation(task):
        key = text_key(task)
        overhead = _n_tokens(tokenizer, prompt_and_answer(task, {**row, key: ""})[0], True)
        if overhead + room > max_len:
            answer = _keep_first_tokens(tokenizer, prompt_and_answer(task, row)[1], max_len - overhead - 1)
            return {**row, key: "", "answer": answer}, True
    return fit_prompt(tokenizer, task, row, max_len - room)[0], True


def fit_rows(tokenizer, task: str, rows: list[dict], max_len: int, prompt_only: bool = False
             ) -> tuple[list[dict], int]:
    """(every row fitted into `max_len` tokens, how many were cut): training examples (`fit_example`), or with
    `prompt_only` prompts alone (`fit_prompt`: a GSM8K question to generate from). The rows that fit are found
    with one batched tokenization; only the others are cut one by one."""
    prompts = [prompt_and_answer(task, r)[0] for r in rows]
    lengths = [len(x) for x in tokenizer(prompts, add_special_tokens=True)["input_ids"]] if rows else []
    if prompt_only:
        rooms = [0] * len(rows)
    elif label_words(task):
        rooms = [answer_room(tokenizer, task)] * len(rows)
    else:
        answers = [prompt_and_answer(task, r)[1] for r in rows]
        rooms = [1 + len(x) for x in tokenizer(answers, add_special_tokens=False)["input_ids"]] if rows else []
    out, cut = [], 0
    for row, n, room in zip(rows, lengths, rooms):
        if n + room <= max_len:
            out.append(row)
            continue
        out.append(fit_prompt(tokenizer, task, row, max_len)[0] if prompt_only else
                   fit_example(tokenizer, task, row, max_len, room)[0])
        cut += 1
    return out, cut


def n_longer(tokenizer, texts: list[str], max_len: int) -> int:
    """How many of `texts` `tokenize_public` cuts to `max_len` tokens."""
    return sum(len(ids) > max_len for ids in tokenizer(list(texts), add_special_tokens=True)["input_ids"]) \
        if texts else 0


def check_max_len(tokenizer, task: str, max_len: int, key: str = "data.max_len") -> None:
    """`key` (data.max_len, eval.max_len) must hold the task's prompt template, MIN_TEXT_TOKENS of text and the
    answer (`answer_room`); ConfigError naming the key and the smallest value that does."""
    from .config import ConfigError

    need = _n_tokens(tokenizer, prompt_and_answer(task, empty_row(task))[0], True) + MIN_TEXT_TOKENS + \
        answer_room(tokenizer, task)
    if max_len < need:
        raise ConfigError(f"{key}={max_len}: the {task} prompt template, {MIN_TEXT_TOKENS} tokens of text "
                          f"and the answer need {need} tokens of this model's tokenizer; set {key} >= {need}")


def truncation_counts(tokenizer, task: str, limits: dict[str, int], train: list[dict], val: list[dict],
                      test: list[dict], shots: list[dict], public: list[str]) -> dict[str, int]:
    """How many inputs of a run are cut to fit, each with how many there are (n_<name>), as the run cuts them:
    `train` (the clients' training rows) to limits["max_len"] (data.max_len), `val` and `test` (the rows evaluated)
    and `shots` (GSM8K's k shots) to limits["eval_max_len"], `public` (D_public's pool and held-out texts) to
    limits["public_max_len"]."""
    generate, at = is_generation(task), limits["eval_max_len"]  # GSM8K's validation and test rows: prompts alone
    counts = {"train": fit_rows(tokenizer, task, train, limits["max_len"])[1],
              "val": fit_rows(tokenizer, task, val, at, prompt_only=generate)[1],
              "test": fit_rows(tokenizer, task, test, at, prompt_only=generate)[1],
              "shots": fit_rows(tokenizer, task, shots, at)[1],
              "public": n_longer(tokenizer, public, limits["public_max_len"])}
    sizes = {"n_train": len(train), "n_val": len(val), "n_test": len(test), "n_shots": len(shots),
             "n_public": len(public)}
    return {**counts, **sizes}


def truncation_line(counts: dict[str, int], limits: dict[str, int]) -> str:
    """The log line of `truncation_counts`."""
    def part(key: str, what: str) -> str:
        return f"{counts[key]} of {counts['n_' + key]} {what}"

    evaluated = ", ".join(part(k, what) for k, what in (("val", "validation rows"), ("test", "test rows"),
                                                          ("shots", "GSM8K shots")) if counts["n_" + k])
    return (f"inputs cut to fit: {part('train', 'training rows')} (data.max_len={limits['max_len']} tokens); "
            f"{evaluated} (eval.max_len={limits['eval_max_len']}); {part('public', 'public texts')} "
            f"(data.public_max_len={limits['public_max_len']})")
