"""Tiny, deterministic model folders for runs that check wiring, not model quality: the tests (fixtures
`tiny_model_dir`, `tiny_qwen2_dir`; tests/tiny_models.py re-exports this module) and the smoke check
(`python -m fedsoda_mpi.smoke --model tiny`, which builds one in a temporary folder).

`build_tokenizer(folder)` trains a byte-level BPE tokenizer (VOCAB tokens) on a fixed slice of the task data
(SST-2, BoolQ, GSM8K train and WikiText-2, read from `fedsoda_mpi.data.data_dir()`; a built-in text if the data
folder is missing) plus the prompt template and the label words, and saves it as a PreTrainedTokenizerFast with
SmolLM2's special tokens (<|endoftext|> 0 = unk, <|im_start|> 1 = bos, <|im_end|> 2 = eos = pad; no BOS added)
and a ChatML chat template.

`build_model(folder, family)` writes a seeded random-weight causal LM next to that tokenizer:
- "llama": LlamaForCausalLM shaped like SmolLM2 where the code cares (30 decoder layers, tied embeddings, the
  same special-token ids) but hidden 64, 4 heads of 16 (2 KV heads), MLP 256, vocab VOCAB: ~8 MB of fp32;
  every decoder Linear has a multiple of 64 weights, so bitsandbytes NF4 (blocksize 64) quantizes it on CPU.
- "qwen2": Qwen2ForCausalLM of the same shape with an UNTIED output head (tie_word_embeddings=false).
- the other families of FAMILY_CONFIGS (mistral, qwen3, gemma, gemma2, gemma3_text, phi3, olmo2, granite, ...): the same
  shape with each family's own features switched on (sliding windows of WINDOW tokens, logit softcapping, granite's
  multipliers); tests/test_families.py builds them, in memory (`model_config`) or as folders.

No file depends on the SmolLM2 GGUF conversion; the same inputs give the same bytes (seeded init, deterministic
BPE training on a fixed corpus).
"""
from __future__ import annotations

import json
from pathlib import Path

VOCAB = 4096
HIDDEN, FFN, HEADS, KV_HEADS, HEAD_DIM, LAYERS = 64, 256, 4, 2, 16, 30
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
                 "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                 "{% endif %}")
# rows per file the tokenizer is trained on (the first ones: fixed, so the vocabulary is too)
CORPUS_ROWS = {"sst2/train.jsonl": 6000, "boolq/train.jsonl": 1500, "gsm8k/train.jsonl": 1500}
FALLBACK_TEXT = ("the movie was good and the acting was bad . is the answer true or false ? "
                 "Natalia sold clips to 48 of her friends in April , and then she sold half as many clips in May . "
                 "How many clips did Natalia sell altogether in April and May ? #### 72 ")


def _corpus() -> list[str]:
    """The fixed training text of the tokenizer (the first rows of the task files, templates, label words)."""
    from fedsoda_mpi.data import ANSWER_LEAD, LABEL_WORDS, TEMPLATE, data_dir

    root = data_dir()
    texts = []
    for rel, n in CORPUS_ROWS.items():
        path = root / rel
        if not path.is_file():
            continue
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if i >= n:
                    break
                row = json.loads(line)
                texts.extend(str(v) for k, v in row.items() if isinstance(v, str))
    wiki = root / "wikitext2/test.txt"
    if wiki.is_file():
        texts.extend(wiki.read_text(encoding="utf-8").splitlines()[:1500])
    if not texts:
        texts = [FALLBACK_TEXT] * 200
    words = [w for words in LABEL_WORDS.values() for w in words]
    texts += [TEMPLATE.format(instruction="Classify the text.") + f"{ANSWER_LEAD} {w}" for w in words] * 50
    texts += [" ".join(words)] * 50 + [" ".join(str(i) for i in range(100))] * 5
    return texts


def build_tokenizer(folder: Path):
    """Train the byte-level BPE on `_corpus()` and save it into `folder`; returns the fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, min_frequency=2, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=SPECIALS[0], bos_token=SPECIALS[1],
                                   eos_token=SPECIALS[2], pad_token=SPECIALS[2], model_max_length=4096,
                                   clean_up_tokenization_spaces=False)
    fast.chat_template = CHAT_TEMPLATE
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(folder)
    return fast


# the configs of the other families (`FAMILY_CONFIGS`): small sliding windows so short test sequences cross them,
# and each family's own extras switched on (gemma logit softcapping, granite multipliers, cohere logit_scale)
WINDOW = 8


def _family_kwargs(family: str, layers: int) -> tuple[str, dict]:
    """(transformers config class name, the family's own settings) of a tiny `family` model."""
    table = {
        "llama": ("LlamaConfig", dict(tie_word_embeddings=True, rope_theta=100000.0)),
        "qwen2": ("Qwen2Config", dict(tie_word_embeddings=False, use_sliding_window=False)),
        "mistral": ("MistralConfig", dict(tie_word_embeddings=False, sliding_window=WINDOW)),
        "qwen3": ("Qwen3Config", dict(tie_word_embeddings=True, use_sliding_window=True, sliding_window=WINDOW,
                                      max_window_layers=layers // 2)),
        "gemma": ("GemmaConfig", dict(tie_word_embeddings=True)),
        "gemma2": ("Gemma2Config", dict(tie_word_embeddings=True, sliding_window=WINDOW, query_pre_attn_scalar=HEAD_DIM,
                                        final_logit_softcapping=5.0, attn_logit_softcapping=50.0)),
        "gemma3_text": ("Gemma3TextConfig", dict(tie_word_embeddings=True, sliding_window=WINDOW,
                                                 query_pre_attn_scalar=HEAD_DIM, final_logit_softcapping=5.0)),
        "phi3": ("Phi3Config", dict(tie_word_embeddings=False, sliding_window=WINDOW)),
        "olmo2": ("Olmo2Config", dict(tie_word_embeddings=False)),
        "granite": ("GraniteConfig", dict(tie_word_embeddings=True, embedding_multiplier=12.0,
                                          residual_multiplier=0.22, attention_multiplier=1.0 / HEAD_DIM,
                                          logits_scaling=8.0)),
        "olmo3": ("Olmo3Config", dict(tie_word_embeddings=False, sliding_window=WINDOW)),
        "smollm3": ("SmolLM3Config", dict(tie_word_embeddings=True, use_sliding_window=True, sliding_window=WINDOW)),
        "ministral": ("MinistralConfig", dict(tie_word_embeddings=False, sliding_window=WINDOW)),
        "starcoder2": ("Starcoder2Config", dict(tie_word_embeddings=True, sliding_window=WINDOW)),
        "cohere": ("CohereConfig", dict(tie_word_embeddings=True, logit_scale=0.5)),
        "cohere2": ("Cohere2Config", dict(tie_word_embeddings=True, sliding_window=WINDOW, logit_scale=0.5)),
        "exaone4": ("Exaone4Config", dict(tie_word_embeddings=False, sliding_window=WINDOW)),
    }
    if family not in table:
        raise ValueError(f"tiny.py builds no {family!r} model; families: {', '.join(table)}")
    return table[family]


FAMILY_CONFIGS = ("llama", "qwen2", "mistral", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo2", "granite",
                  "olmo3", "smollm3", "ministral", "starcoder2", "cohere", "cohere2", "exaone4")


def model_config(family: str, vocab: int, layers: int = LAYERS):
    """The config of a tiny `family` model (one of FAMILY_CONFIGS): SmolLM2's special-token ids, hidden 64,
    4 heads of 16 (2 KV heads), MLP 256, `layers` decoder layers, plus the family's own settings."""
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=layers,
                  num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
                  max_position_embeddings=4096, rms_norm_eps=1e-5, initializer_range=0.02,
                  bos_token_id=1, eos_token_id=2, pad_token_id=2)
    cls_name, extra = _family_kwargs(family, layers)
    return getattr(tf, cls_name)(**common, **extra)


def build_model(folder: Path, family: str = "llama", seed: int = 0, layers: int = LAYERS) -> Path:
    """A seeded random-weight `family` model + the tiny tokenizer in `folder` (created); returns `folder`."""
    import torch
    import transformers as tf

    tokenizer = build_tokenizer(folder)
    config = model_config(family, len(tokenizer), layers)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.config.architectures = [type(model).__name__]
    model.generation_config = tf.GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model.save_pretrained(folder, safe_serialization=True)
    return folder
