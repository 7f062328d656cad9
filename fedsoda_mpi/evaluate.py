"""Evaluation of FedSODA models (the paper's Sec. 6 metric, accuracy: the full LLM with the plugged
adapter LoRA, and the sub-LLM M* for comparison).

- SST-2 / BoolQ: label-word likelihood. One forward per prompt (batched, right padding); the LM head runs
  only on each row's last prompt token, and the prediction is the label word with the larger logit.
- GSM8K: k-shot greedy generation (the paper's "GSM8K (4-shot)"), final-number extraction, numeric match
  (answers.py).
  The k-shot prefix is the same for every question: it is prefilled once and its KV cache shared by batches.
  An evaluation of hours can be resumed: a `Journal` file keeps the outputs of every finished batch.
- Perplexity of plain text (a sanity metric for pruned / aligned sub-LLMs).

Every entry point accepts plain HF causal LMs, PeftModels and NF4 (bitsandbytes Linear4bit) models; it runs
them in eval mode and restores each module's previous training flag on exit.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from transformers import DynamicCache, GenerationConfig, StoppingCriteria, StoppingCriteriaList
from transformers.cache_utils import DynamicLayer

from . import models
from .answers import extract_number, same_number, truncate_at_stop
from .data import (ensure_pad_token, gsm8k_final_number, gsm8k_shots, label_of, load_rows, prompt_and_answer,
                   shots_prefix)
from .tasks import custom_correct, is_custom, is_generation, label_words
from .host import to_numpy
from .lengths import fit_rows

JOURNAL_FORMAT = 2  # of `Journal` files and of the decoding they record: raise it when either changes
# 2: a solution also ends with its final-answer line ("#### N" and its line break; `answers.answer_line_end`)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _first(rows: Sequence[dict], max_examples: int | None) -> list[dict]:
    """The deterministic evaluation subset: the first `max_examples` rows (all rows if None)."""
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples must be >= 1 or None, got {max_examples}")
    rows = list(rows if max_examples is None else rows[:max_examples])
    if not rows:
        raise ValueError("no rows to evaluate")
    return rows


def _pad(seqs: Sequence[Sequence[int]], pad_id: int, side: str, device: torch.device
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token-id lists to one (B, T) batch on `side` ("left" | "right"); returns (input_ids, attention_mask)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        cols = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        ids[i, cols] = torch.tensor(s, dtype=torch.long)
        mask[i, cols] = 1
    return ids.to(device), mask.to(device)


def _body_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(decoder stack, causal LM) of an HF causal LM, or of the model inside a PeftModel (LoRA layers stay active):
    the body gives final hidden states, the causal LM's head and logit transforms (`models.head_logits`) logits."""
    return models.decoder(model), models.causal_lm(model)


def label_word_ids(tokenizer, task: str) -> list[int]:
    """Token id of each label word of `task` (index = class label): the first token of `" " + word`.

    This is the token `data.tokenize_sft` trains the model to predict right after the prompt (the answer
    " positive" is tokenized on its own); ValueError if two label words start with the same token.
    """
    words = label_words(task)
    if not words:
        raise ValueError(f"task {task!r} has no label words (a generation task)")
    ids = []
    for word in words:
        tokens = tokenizer(" " + word, add_special_tokens=False).input_ids
        if not tokens:
            raise ValueError(f"label word {word!r} tokenizes to nothing")
        ids.append(tokens[0])
    if len(set(ids)) != len(ids):
        raise ValueError(f"label words {', '.join(words)} of task {task!r} share a first token ({ids}); "
                         "label-word likelihood cannot tell them apart with this tokenizer")
    return ids


@torch.no_grad()
def label_accuracy(model: torch.nn.Module, tokenizer, task: str, rows: Sequence[dict], batch_size: int = 8,
                   max_examples: int | None = None, max_len: int | None = None,
                   progress: Callable[[int, int, int], None] | None = None) -> dict:
    """Label-word likelihood accuracy on SST-2 / BoolQ.

    Rows are sorted by prompt length into right-padded batches; the decoder body gives hidden states, the
    row's last non-pad position is gathered and only those B vectors go through the LM head. The prediction
    is the argmax over the label words' logits. `max_len` (eval.max_len): every prompt is cut as a training example
    of that length would be (`lengths.fit_rows`: the text from the left, the template and the label position kept),
    so a batch holds at most batch_size x max_len tokens; None keeps the prompts whole. `progress(done, total, done)`
    is called after every batch (rows done of all).
    Returns {"accuracy", "n", "truncated" (prompts cut to max_len), "predictions" [n] (row order),
    "label_logits" [n, n_labels], "pred_counts" and "label_counts" [n_labels] (how often each class is predicted
    and how often it is the answer: a model that predicts one class scores the majority share, not chance)}.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rows = _first(rows, max_examples)
    word_ids = torch.tensor(label_word_ids(tokenizer, task))
    ensure_pad_token(tokenizer)
    fitted, truncated = (rows, 0) if max_len is None else fit_rows(tokenizer, task, rows, max_len)
    encoded = tokenizer([prompt_and_answer(task, r)[0] for r in fitted]).input_ids
    labels = np.array([label_of(task, r) for r in rows])
    order = np.argsort([len(e) for e in encoded], kind="stable")
    scores = np.zeros((len(rows), len(word_ids)), dtype=np.float32)
    with models.mode(model):
        body, causal = _body_and_head(model)
        device = _device(model)
        for start in range(0, len(rows), batch_size):
            idx = order[start:start + batch_size]
            ids, mask = _pad([encoded[i] for i in idx], tokenizer.pad_token_id, "right", device)
            hidden = body(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            last = hidden[torch.arange(len(idx), device=device), mask.sum(1) - 1]
            scores[idx] = to_numpy(_label_logits(causal, last, word_ids.to(device)))
            if progress:
                progress(start + len(idx), len(rows), start + len(idx))
    predictions = scores.argmax(axis=1)
    k = len(word_ids)
    return {"accuracy": float((predictions == labels).mean()), "n": len(rows), "truncated": truncated,
            "predictions": predictions,
            "label_logits": scores, "pred_counts": np.bincount(predictions, minlength=k).tolist(),
            "label_counts": np.bincount(labels, minlength=k).tolist()}


def _label_logits(causal: torch.nn.Module, last: torch.Tensor, word_ids: torch.Tensor) -> torch.Tensor:
    """The label words' logits (LM head and the family's logit transforms, `models.head_logits`), run outside
    autocast in the head's own dtype: under eval.dtype=bfloat16 an fp32 model's head still gives fp32 logits (at
    logits of 16-32 bfloat16 resolves steps of 0.125, and argmax would break the rounded ties towards class 0)."""
    head = causal.get_output_embeddings()
    with torch.autocast(last.device.type, enabled=False):
        return models.head_logits(causal, last.to(head.weight.dtype))[:, word_ids].float()


class _StopOnStrings(StoppingCriteria):
    """Per-row stop once the generated part (after the padded prompt of width `prompt_len`) holds a stop string or
    a finished final-answer line (`truncate_at_stop` would cut it)."""

    def __init__(self, tokenizer, prompt_len: int):
        self.tokenizer, self.prompt_len = tokenizer, prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_len:], skip_special_tokens=True)
        return torch.tensor([truncate_at_stop(t) != t for t in texts], device=input_ids.device)


def _greedy_config(model: torch.nn.Module, tokenizer, max_new_tokens: int) -> tuple[GenerationConfig, set[int]]:
    """Greedy GenerationConfig stopping at every eos id of the tokenizer and the model (and the pad id); the id set."""
    ensure_pad_token(tokenizer)
    pad_id = tokenizer.pad_token_id
    eos = {tokenizer.eos_token_id, pad_id}
    model_eos = model.generation_config.eos_token_id if getattr(model, "generation_config", None) else None
    eos.update(model_eos if isinstance(model_eos, list) else [model_eos])
    eos.discard(None)
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                              eos_token_id=sorted(eos))
    return config, eos


def _decode(tokenizer, tokens: Sequence[int], eos: set[int]) -> str:
    """Generated ids -> text: cut at the first eos / pad id, then at the first stop string, trailing space stripped."""
    end = next((j for j, t in enumerate(tokens) if t in eos), len(tokens))
    return truncate_at_stop(tokenizer.decode(tokens[:end], skip_special_tokens=True)).rstrip()


@torch.no_grad()
def _prefix_cache(model: torch.nn.Module, prefix_ids: Sequence[int]) -> DynamicCache | None:
    """KV cache of `prefix_ids` (batch 1) from one forward of the decoder body (no LM head); None when the model's
    cache is not a plain full-attention DynamicCache (sliding-window / linear-attention layers), which the
    pad-between-prefix-and-question layout of `_generate` cannot reproduce exactly."""
    body = models.decoder(model)
    cache = DynamicCache(config=models.causal_lm(model).config)
    if not cache.layers or any(type(layer) is not DynamicLayer for layer in cache.layers):
        return None
    ids = torch.tensor([list(prefix_ids)], dtype=torch.long, device=_device(model))
    out = body(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache, use_cache=True)
    cache = out.past_key_values
    if not isinstance(cache, DynamicCache) or cache.get_seq_length() != len(prefix_ids):
        return None
    return cache


class Journal:
    """Resumable generation: the outputs of every finished batch, appended to a JSON-lines file (one line per batch,
    flushed and synced) after a header line with the evaluation's fingerprint (`fingerprint`: prompts, decoding
    settings, the model's adapter weights). Opened again with the same fingerprint, it hands back the batches it
    holds and `_generate` runs only the others; batches are cut from the whole ordered prompt list, so those are
    exactly the batches of an uninterrupted evaluation and the outputs are the same. A last line cut short (SIGKILL
    mid-write) is dropped; a file with another fingerprint is started over."""

    def __init__(self, path: str | Path, fingerprint: dict):
        self.path, self.done, self.earlier_s = Path(path), {}, 0.0
        lines = self.path.read_bytes().split(b"\n") if self.path.is_file() else []
        try:
            same = bool(lines) and json.loads(lines[0]) == {"fingerprint": fingerprint}
        except ValueError:
            same = False
        kept = [lines[0]] if same else [json.dumps({"fingerprint": fingerprint}).encode()]
        for line in lines[1:] if same else []:
            try:
                batch = json.loads(line)
                pairs = list(zip(batch["rows"], batch["outputs"], strict=True))
            except (ValueError, KeyError, TypeError):
                break  # the line a kill cut short, and nothing after it
            self.done.update(pairs)
            self.earlier_s += float(batch.get("s", 0.0))  # generation seconds of the batches earlier attempts did
            kept.append(line)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(b"".join(line + b"\n" for line in kept))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self.resumed = len(self.done)

    def get(self, rows: Sequence[int]) -> list[str] | None:
        """The recorded outputs of a batch of `rows`, or None when any of them is missing."""
        return [self.done[i] for i in rows] if all(i in self.done for i in rows) else None

    def record(self, rows: Sequence[int], outputs: Sequence[str], seconds: float) -> None:
        """Append one finished batch and the seconds it took (flushed and fsynced: a kill right after it loses
        nothing)."""
        line = {"rows": [int(i) for i in rows], "outputs": list(outputs), "s": round(seconds, 3)}
        with open(self.path, "ab") as f:
            f.write(json.dumps(line).encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
        self.done.update(zip(rows, outputs))


def fingerprint(model: torch.nn.Module, prompts: Sequence[str], **settings) -> dict:
    """What a journaled evaluation's outputs depend on: the prompts (sha256), the decoding `settings`, the autocast
    dtype on the model's device, the journal format and the transformers version, every parameter's name, shape and
    dtype, and the values of the LoRA tensors (sha256; the frozen weights are fixed by the names, the model file and
    the run's seed, and hashing them all would cost seconds per GB)."""
    h = hashlib.sha256()
    for name, t in sorted(models.causal_lm(model).state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        if "lora_" in name:
            h.update(to_numpy(t.detach().contiguous().view(torch.uint8)).tobytes())
    device = _device(model).type
    cast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    return {"format": JOURNAL_FORMAT, "transformers": transformers.__version__,
            "prompts_sha256": hashlib.sha256("\0".join(prompts).encode()).hexdigest(), "n": len(prompts),
            "weights_sha256": h.hexdigest(), "autocast": str(cast), **settings}


def _generate(model: torch.nn.Module, tokenizer, prompts: Sequence[str], max_new_tokens: int,
              batch_size: int, shared_prefix: str = "", journal: Journal | None = None,
              progress: Callable[[int, int, int], None] | None = None) -> list[str]:
    """Greedy continuations of `prompts`, cut at eos / stop strings / the end of the final-answer line
    (`truncate_at_stop`) and stripped of trailing whitespace.

    Whole-prompt path (`shared_prefix` ""): every prompt is tokenized whole; batches of `batch_size` prompts
    (sorted by length) are left-padded and generated. `batch_size` 1 is the naive reference loop.

    Prefix-cached path (`shared_prefix` a string every prompt starts with): the prefix is tokenized and run
    through the model once; its KV cache is copied to each batch of prompts, which then only prefill their own
    tokens. A prompt uses the cache only if its own whole tokenization starts with the prefix's tokens (then
    cache + rest is token for token the whole prompt; end `shared_prefix` before any whitespace that BPE could
    merge with the next word); other prompts take the whole-prompt path. A batch row is laid out as
    [prefix][pads][prompt rest] with attention mask 0 on the pads, so generate's position ids (attention mask
    cumsum - 1) of every real token are those of the unpadded prompt.

    `journal`: batches it holds are not generated again, finished ones are recorded in it. `progress(done, total,
    generated)` runs after every batch (prompts done, of all, of them generated by this call); it may raise to stop.
    Padding is built here from token ids, so the tokenizer's padding side is never changed.
    """
    config, eos = _greedy_config(model, tokenizer, max_new_tokens)
    encoded = tokenizer(list(prompts)).input_ids
    outputs, done, generated = [""] * len(prompts), 0, 0
    for idx, make in _batches(model, tokenizer, encoded, prompts, batch_size, shared_prefix, config.pad_token_id):
        texts = journal.get(idx) if journal else None
        if texts is None:
            t0 = time.perf_counter()
            ids, mask, past = make()
            stop = StoppingCriteriaList([_StopOnStrings(tokenizer, ids.shape[1])])
            tokens = model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                                    stopping_criteria=stop, **({} if past is None else {"past_key_values": past}))
            texts = [_decode(tokenizer, t, eos) for t in tokens[:, ids.shape[1]:].tolist()]
            generated += len(idx)
            if journal:
                journal.record(idx, texts, time.perf_counter() - t0)
        for i, text in zip(idx, texts):
            outputs[i] = text
        done += len(idx)
        if progress:
            progress(done, len(prompts), generated)
    return outputs


def _batches(model, tokenizer, encoded: list[list[int]], prompts: Sequence[str], batch_size: int,
             shared_prefix: str, pad_id: int) -> list[tuple[list[int], Callable]]:
    """The generation batches of `_generate`, in order: (prompt indices, a function building (input_ids,
    attention_mask, prefix KV cache or None)); the prefix-cached batches first, then the whole-prompt ones."""
    device, whole, batches = _device(model), list(range(len(prompts))), []
    if shared_prefix:
        prefix_ids = tokenizer(shared_prefix).input_ids
        cached = [i for i in whole if prompts[i].startswith(shared_prefix) and len(encoded[i]) > len(prefix_ids)
                  and encoded[i][:len(prefix_ids)] == prefix_ids]
        cache = _prefix_cache(model, prefix_ids) if prefix_ids and cached else None
        if cache is not None:
            whole = sorted(set(whole) - set(cached))
            rest = {i: encoded[i][len(prefix_ids):] for i in cached}

            def with_prefix(idx: list[int]) -> tuple:
                ids, mask = _pad([rest[i] for i in idx], pad_id, "left", device)
                head = torch.tensor(prefix_ids, dtype=torch.long, device=device).expand(len(idx), -1)
                past = copy.deepcopy(cache)
                past.batch_repeat_interleave(len(idx))
                return torch.cat([head, ids], 1), torch.cat([torch.ones_like(head), mask], 1), past

            order = sorted(cached, key=lambda i: len(rest[i]))
            batches += [(idx, lambda idx=idx: with_prefix(idx))
                        for idx in (order[s:s + batch_size] for s in range(0, len(order), batch_size))]
    order = sorted(whole, key=lambda i: len(encoded[i]))
    batches += [(idx, lambda idx=idx: (*_pad([encoded[i] for i in idx], pad_id, "left", device), None))
                for idx in (order[s:s + batch_size] for s in range(0, len(order), batch_size))]
    return batches


def gsm8k_correct(outputs: Sequence[str], rows: Sequence[dict], task: str = "gsm8k") -> np.ndarray:
    """[n] int8, 1 where a generated solution's extracted final number equals its row's reference "#### N"
    numerically (the per-question record run files keep as /final correct, /base correct); a custom task compares
    the final answers its task.json defines (`tasks.custom_correct`)."""
    if is_custom(task):
        return np.array([custom_correct(task, o, r) for o, r in zip(outputs, rows)], dtype=np.int8)
    return np.array([same_number(extract_number(o), gsm8k_final_number(r["answer"]))
                     for o, r in zip(outputs, rows)], dtype=np.int8)


@torch.no_grad()
def gsm8k_accuracy(model: torch.nn.Module, tokenizer, rows: Sequence[dict], train_rows: Sequence[dict], k: int = 4,
                   max_new_tokens: int = 256, batch_size: int = 4, max_examples: int | None = None,
                   seed: int = 0, prefix_cache: bool = True, journal: str | Path | None = None,
                   progress: Callable[[int, int, int], None] | None = None, max_len: int | None = None,
                   task: str = "gsm8k") -> dict:
    """k-shot greedy GSM8K accuracy (or that of a custom generation `task`): the same k training solutions (chosen by
    `seed`) prefix every question; a solution is correct when its extracted final number equals the reference
    "#### N" numerically.

    prefix_cache True: the k-shot prefix without its trailing blank line (tokenized alone, "\\n\\n" becomes one
    token, but two before the question's "Below") is prefilled once and its KV cache shared by every batch of
    questions; False: every prompt is prefilled whole (`batch_size` 1: the naive one-question-at-a-time loop).
    `journal`: a file that keeps every finished batch (`Journal`), so a killed evaluation resumes where it stopped;
    `progress` as in `_generate`. `max_len` (eval.max_len): each shot is cut as a training example of that length
    (`lengths.fit_rows`) and each question's prompt to at most max_len tokens, its question from the left, so a
    prompt holds at most (k + 1) x max_len tokens; None keeps them whole.
    Returns {"accuracy", "n", "outputs" (generated texts, row order), "correct" [n] int8 (`gsm8k_correct`), "resumed"
    (questions taken from the journal), "seconds" (this call's, plus the generation time of the journal's batches),
    "truncated" (questions cut), "shots_truncated" (shots cut)}.
    """
    t0 = time.perf_counter()
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size}, {max_new_tokens}")
    rows = _first(rows, max_examples)
    shots = gsm8k_shots(list(train_rows), k, seed)
    fitted, truncated, shots_truncated = rows, 0, 0
    if max_len is not None:
        shots, shots_truncated = fit_rows(tokenizer, task, shots, max_len)
        fitted, truncated = fit_rows(tokenizer, task, rows, max_len, prompt_only=True)
    prefix = shots_prefix(shots, task)
    prompts = [prefix + prompt_and_answer(task, r)[0] for r in fitted]
    shared = prefix.rstrip() if prefix_cache else ""
    with models.mode(model):
        book = None if journal is None else Journal(journal, fingerprint(
            model, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, shared_prefix=shared))
        outputs = _generate(model, tokenizer, prompts, max_new_tokens, batch_size, shared_prefix=shared,
                            journal=book, progress=progress)
    correct = gsm8k_correct(outputs, rows, task)
    return {"accuracy": float(correct.mean()), "n": len(rows), "outputs": outputs, "correct": correct,
            "resumed": book.resumed if book else 0, "truncated": truncated, "shots_truncated": shots_truncated,
            "seconds": time.perf_counter() - t0 + (book.earlier_s if book else 0.0)}


def evaluate(model: torch.nn.Module, tokenizer, task: str, max_examples: int | None = None, batch_size: int = 8,
             k_shot: int = 4, max_new_tokens: int = 256, seed: int = 0, rows: Sequence[dict] | None = None,
             shot_rows: Sequence[dict] | None = None, journal: str | Path | None = None,
             progress: Callable[[int, int, int], None] | None = None, max_len: int | None = None) -> dict:
    """Accuracy of `model` on `task` (sst2 | boolq | custom classification: label likelihood; gsm8k | custom
    generation: k-shot generation) over `rows` (default: the test split); the k shots are drawn from `shot_rows`
    (default: the train split).
    `journal` serves the generation tasks, which take hours (`gsm8k_accuracy`); a label task, minutes, ignores it.
    `progress` is called as the rows are done. `max_len` bounds the prompts (`label_accuracy`, `gsm8k_accuracy`)."""
    rows = load_rows(task, "test") if rows is None else rows
    if is_generation(task):
        shots = load_rows(task, "train") if shot_rows is None else shot_rows
        return gsm8k_accuracy(model, tokenizer, rows, shots, k=k_shot, max_new_tokens=max_new_tokens,
                              batch_size=batch_size, max_examples=max_examples, seed=seed, journal=journal,
                              progress=progress, max_len=max_len, task=task)
    return label_accuracy(model, tokenizer, task, rows, batch_size=batch_size, max_examples=max_examples,
                          max_len=max_len, progress=progress)


@torch.no_grad()
def perplexity(model: torch.nn.Module, tokenizer, texts: Sequence[str], max_len: int = 256) -> float:
    """exp(mean next-token NLL) over all tokens of `texts`, each truncated to `max_len` tokens."""
    total_nll, total_tokens = 0.0, 0
    with models.mode(model):
        device = _device(model)
        for text in texts:
            ids = tokenizer(text, truncation=True, max_length=max_len, return_tensors="pt").input_ids.to(device)
            if ids.shape[1] < 2:
                continue
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
            total_nll += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            total_tokens += ids.shape[1] - 1
    if total_tokens == 0:
        raise ValueError("perplexity needs at least one text of two or more tokens")
    return math.exp(total_nll / total_tokens)
