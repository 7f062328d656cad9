"""bitsandbytes quantization of the client's sub-LLM M*: its decoder Linears in NF4 (`nf4_config`, QLoRA; the CPU
trap every loader must undo: `fix_bnb_cpu`), and its frozen input embedding and LM head (`quant.embed_bits` = 8 or 4).

The client never trains E* or the LM head (Algorithm 2: LoRA on decoder layers only), yet in fp32 they are most of
its model: SmolLM2's tied 49152 x 576 fp32 table is 108 of the 145 MiB a FedSODA client holds; LLaMA3-8B's untied
embedding and head in bfloat16 are 1.96 of its 4.05 GiB bundle (docs/gpu.md). `quantize_embeddings` replaces both
modules of a built sub-LLM M* by `QuantEmbedding` / `QuantHead` over a `QuantTable`:

- 8 bits: LLM.int8's row-wise absmax code (bitsandbytes `int8_vectorwise_quant`): int8 codes [V, D] and one float32
  scale per row, 8 + 32 / D bits per weight.
- 4 bits: NF4 in blocks of 64 along a row (bitsandbytes `quantize_4bit`, as the decoder's Linear4bit), with the block
  constants double-quantized when `quant.double_quant` (about 4.127 bits per weight).

A tied model keeps ONE table: the head is the same `QuantTable` module as the embedding (`head.weight is
embedding.weight`), so it is stored and shipped once. The embedding dequantizes only the looked-up rows; the head
dequantizes the whole table to the hidden states' dtype at each call and multiplies by it, so gradients flow through
the head to the LoRA below (the table itself is a buffer and gets none). The table's tensors are buffers of the
modules, serialized in the bundle's safetensors file as `<module>.weight.<part>` and described in config.json under
`CONFIG_KEY`; `restore_embeddings` rebuilds the modules on the receiving side (`models.load_bundle`) from exactly
those bytes, on the model's device.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

EMBED_BITS = (16, 8, 4)  # quant.embed_bits: 16 keeps the table in the model's dtype
BLOCKSIZE = 64  # NF4 block along a row (bitsandbytes' default; a row must hold whole blocks)
CONFIG_KEY = "fedsoda_embed_quant"  # config.json entry of a bundle whose embedding / head are QuantTables
REQUIRED = {8: {"codes", "row_scale"}, 4: {"codes", "block_absmax", "nf4_map"}}  # a table's buffers (4: + nested)


class EmbedQuantError(ValueError):
    """A model whose embedding or head quant.embed_bits cannot quantize; the message is one line."""


class QuantTable(nn.Module):
    """A frozen [rows, cols] weight table held quantized; `dtype` is the dtype it dequantizes to.

    Looks like a weight where code reads one (`dtype`, `device`, `shape`); arithmetic on it fails loudly."""

    def __init__(self, bits: int, shape: tuple[int, int], dtype: torch.dtype, parts: dict[str, torch.Tensor]):
        super().__init__()
        self.bits, self.shape, self.dtype = bits, torch.Size(shape), dtype
        for name, tensor in parts.items():
            self.register_buffer(name, tensor)

    @classmethod
    def quantize(cls, weight: torch.Tensor, bits: int, double_quant: bool) -> QuantTable:
        """Quantize `weight` [rows, cols] on its own device (8: row-wise int8; 4: NF4 blocks of BLOCKSIZE)."""
        import bitsandbytes.functional as bf

        w = weight.detach()
        if bits == 8:
            codes, scale, _ = bf.int8_vectorwise_quant(w.float().contiguous())
            parts = {"codes": codes, "row_scale": scale}
        else:
            codes, state = bf.quantize_4bit(w.contiguous(), blocksize=BLOCKSIZE, compress_statistics=double_quant,
                                            quant_type="nf4", quant_storage=torch.uint8)
            # the code books are copied: bitsandbytes shares them between tables, and safetensors writes a shared
            # tensor once
            parts = {"codes": codes, "block_absmax": state.absmax, "nf4_map": state.code.clone()}
            if state.nested:
                parts.update(block_absmax2=state.state2.absmax, absmax_map=state.state2.code.clone(),
                             absmax_offset=state.offset.reshape(1))
        return cls(bits, tuple(w.shape), w.dtype, parts)

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def _absmax(self) -> torch.Tensor:
        """NF4 block constants as float32 [rows * cols / BLOCKSIZE] (double quantization undone)."""
        from bitsandbytes.functional import QuantState, dequantize_blockwise

        if not hasattr(self, "block_absmax2"):
            return self.block_absmax
        state2 = QuantState(absmax=self.block_absmax2, code=self.absmax_map, blocksize=256, dtype=torch.float32)
        return dequantize_blockwise(self.block_absmax, state2) + self.absmax_offset

    def _nf4(self, codes: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        from bitsandbytes.functional import QuantState, dequantize_4bit

        state = QuantState(absmax=absmax, shape=torch.Size(shape), code=self.nf4_map, blocksize=BLOCKSIZE,
                           quant_type="nf4", dtype=self.dtype)
        return dequantize_4bit(codes.reshape(-1, 1), state)

    def dequantized(self) -> torch.Tensor:
        """The whole table [rows, cols] in `dtype`."""
        if self.bits == 8:
            return (self.codes.float() * (self.row_scale.unsqueeze(1) / 127.0)).to(self.dtype)
        return self._nf4(self.codes, self._absmax(), tuple(self.shape))

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` (any shape) dequantized: [*ids.shape, cols] in `dtype`; only those rows are decoded."""
        rows, cols = self.shape
        if self.bits == 8:
            picked = F.embedding(ids, self.codes).float() * (F.embedding(ids, self.row_scale.unsqueeze(1)) / 127.0)
            return picked.to(self.dtype)
        codes = F.embedding(ids, self.codes.view(rows, cols // 2))
        absmax = F.embedding(ids, self._absmax().view(rows, cols // BLOCKSIZE))
        return self._nf4(codes, absmax.reshape(-1), (*ids.shape, cols))

    def extra_repr(self) -> str:
        return f"bits={self.bits}, shape={tuple(self.shape)}, dtype={self.dtype}"


class QuantEmbedding(nn.Module):
    """The input embedding E* over a QuantTable: rows looked up, then dequantized."""

    def __init__(self, table: QuantTable):
        super().__init__()
        self.weight = table

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.weight.rows(input_ids)


class QuantHead(nn.Module):
    """The LM head (no bias) over a QuantTable: logits = hidden @ dequantized(table)^T."""

    def __init__(self, table: QuantTable):
        super().__init__()
        self.weight = table

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.weight.dequantized().to(hidden.dtype))


def nf4_config(compute_dtype: torch.dtype, double_quant: bool):
    """transformers' bitsandbytes config of the sub-LLM's decoder Linears: NF4 on load (QLoRA, Algorithm 2 step 2)."""
    import transformers as tf

    return tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                                 bnb_4bit_compute_dtype=compute_dtype)


def fix_bnb_cpu(model) -> int:
    """The must-apply bitsandbytes CPU workaround (docs/design.md, "Toolchain facts"); returns the number of
    4-bit layers touched.

    On AVX512-BF16 CPUs a no-grad eval forward repacks Linear4bit weights into a layout whose matmul has no
    backward, so later LoRA gradients through 4-bit layers silently vanish. Disable that path and undo any
    repacking that already happened (bitsandbytes' inverse is lossy: the packed absmax is bf16, so apply this
    right after loading, before any forward, as every loader here does)."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            state = getattr(module.weight, "quant_state", None)
            if state is not None and getattr(state, "packing_format_for_cpu", False):
                module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                    module.weight.data, state)
                module.quant_state = module.weight.quant_state
            count += 1
    return count


def _plain(model) -> tuple[nn.Embedding, nn.Linear, bool]:
    """The model's input embedding, LM head and whether they share one weight; EmbedQuantError for a family whose
    modules add more than a table lookup / a bias-free product (Gemma's scaled embedding, a head with a bias)."""
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if type(embed) is not nn.Embedding or type(head) is not nn.Linear or head.bias is not None:
        raise EmbedQuantError(
            f"quant.embed_bits: {model.config.model_type}'s embedding ({type(embed).__name__}) or LM head "
            f"({type(head).__name__}) is not a plain table lookup / bias-free linear; use quant.embed_bits=16")
    return embed, head, head.weight is embed.weight


def quantize_embeddings(model, bits: int, double_quant: bool = True):
    """Replace `model`'s input embedding and LM head by quantized ones (one table when tied); `bits` = 16 leaves
    the model as it is. Recorded in config.json (`CONFIG_KEY`) so a bundle says how to rebuild them."""
    if bits == 16:
        return model
    if bits not in EMBED_BITS:
        raise EmbedQuantError(f"quant.embed_bits: expected one of {EMBED_BITS}, got {bits}")
    embed, head, tied = _plain(model)
    cols = embed.weight.shape[1]
    if bits == 4 and cols % BLOCKSIZE:
        raise EmbedQuantError(f"quant.embed_bits=4: the hidden size {cols} is not a multiple of NF4's block of "
                              f"{BLOCKSIZE}; use quant.embed_bits=8")
    table = QuantTable.quantize(embed.weight, bits, double_quant)
    _install(model, table, table if tied else QuantTable.quantize(head.weight, bits, double_quant))
    model.config.update({CONFIG_KEY: {"bits": bits, "tied": tied, "blocksize": BLOCKSIZE}})
    return model


def _install(model, table: QuantTable, head_table: QuantTable) -> None:
    model.set_input_embeddings(QuantEmbedding(table))
    model.set_output_embeddings(QuantHead(head_table))


def restore_embeddings(model, folder: Path):
    """Receiving side: rebuild the quantized embedding / head that config.json's `CONFIG_KEY` describes from the
    tensors of `folder`/model.safetensors (the shipped bytes, unchanged) on the model's device."""
    from safetensors import safe_open

    spec = getattr(model.config, CONFIG_KEY, None)
    if not spec:
        return model
    bits, tied = int(spec["bits"]), bool(spec["tied"])
    device = next(p.device for p in model.parameters())
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    names = {m: n for n, m in model.named_modules()}
    with safe_open(str(Path(folder) / "model.safetensors"), "pt", device="cpu") as st:
        def table(module, dtype):
            prefix = f"{names[module]}.weight."
            parts = {k[len(prefix):]: st.get_tensor(k).to(device) for k in st.keys() if k.startswith(prefix)}
            missing = sorted(REQUIRED[bits] - set(parts))
            if missing:  # transformers' own report of the missing table is silenced (`tables_restored_later`)
                raise EmbedQuantError(f"{folder}: config.json describes a {bits}-bit {names[module]} but "
                                      f"model.safetensors lacks {prefix}{missing[0]}; the bundle is damaged")
            return QuantTable(bits, tuple(module.weight.shape), dtype, parts)

        dtype = embed.weight.dtype
        first = table(embed, dtype)
        _install(model, first, first if tied else table(head, dtype))
    return model


@contextmanager
def tables_restored_later(folder: Path):
    """Around from_pretrained of a bundle folder whose config.json has `CONFIG_KEY`: transformers' load report
    would list the embedding / head weights as missing and their quantized tensors as unexpected, which is by
    design (`restore_embeddings` reads them right after), so it is silenced; other bundles load unchanged."""
    import transformers as tf

    config = json.loads((Path(folder) / "config.json").read_text())
    if CONFIG_KEY not in config:
        yield
        return
    level = tf.logging.get_verbosity()
    tf.logging.set_verbosity_error()
    try:
        yield
    finally:
        tf.logging.set_verbosity(level)
