"""quant.embed_bits: the sub-LLM's frozen input embedding and LM head quantized (fedsoda_mpi/quantize.py), on tiny
models built here: tied (llama, as SmolLM2) and untied (qwen2, as LLaMA3-8B)."""
import json
import math

import h5py
import pytest
import torch
import transformers as tf

from fedsoda_mpi import models as M
from fedsoda_mpi import quantize as Q
from fedsoda_mpi.config import ConfigError, load_config
from fedsoda_mpi.tiny import model_config
from tests.conftest import mpirun, tiny_causal_lm
from tests.test_devices import virtual_loading  # noqa: F401 (fixture)
from tests.test_models import batch, randomize_lora_b, tiny_tokenizer
from tests.virtual_cuda import VirtualCuda, device_of, place

KEPT = [0, 2, 5]
V, D = 128, 64
# logits of the quantized sub-LLM against the same NF4 sub-LLM with a 16-bit table: relative L2 error
# ||z_q - z|| / ||z|| (random tiny weights; measured 0.2-0.4 % at 8 bits, 4-7 % at 4 bits)
LOGIT_TOL = {8: 0.02, 4: 0.15}


def full_model(kind: str):
    """tied: tiny llama (SmolLM2's layout); untied: tiny qwen2 with its own output head (LLaMA3-8B's)."""
    if kind == "tied":
        return tiny_causal_lm("llama", layers=6, vocab=V)
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(model_config("qwen2", V, 6), dtype=torch.float32).eval()


def table_bytes(bits: int, rows: int, cols: int) -> int:
    """Bytes of one quantized table: 8 bits: int8 codes + a float32 scale per row; 4 bits (double quantized): packed
    codes, uint8 block constants, a float32 per 256 of them, the 16-entry NF4 and 256-entry constant code books,
    the offset."""
    n = rows * cols
    if bits == 8:
        return n + 4 * rows
    return n // 2 + n // 64 + 4 * math.ceil(n / 64 / 256) + 4 * 16 + 4 * 256 + 4


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("kind", ["tied", "untied"])
def test_bytes_shrink_and_the_client_stores_what_it_received(kind, bits, tmp_path):
    full = full_model(kind)
    plain, sub = (M.build_sub_model(full, KEPT, quantize=True, embed_bits=b) for b in (16, bits))
    tables = 1 if kind == "tied" else 2
    assert M.stored_bytes(plain) - M.stored_bytes(sub) == tables * (4 * V * D - table_bytes(bits, V, D))
    files = {b: M.model_bundle(m, tiny_tokenizer()) for b, m in ((16, plain), (bits, sub))}
    loaded = {b: M.load_bundle(files[b], tmp_path / str(b))[0] for b in files}
    received = {b: M.safetensors_tensor_bytes(files[b]["model.safetensors"]) for b in files}
    assert received[16] - received[bits] == M.stored_bytes(plain) - M.stored_bytes(sub)
    assert M.stored_bytes(loaded[bits]) == M.stored_bytes(sub)  # stored as received: nothing re-quantized
    assert M.stored_bytes(loaded[bits]) - received[bits] == M.stored_bytes(loaded[16]) - received[16]  # rotary only
    client = loaded[bits]
    embed, head = client.get_input_embeddings(), client.get_output_embeddings()
    assert isinstance(embed, Q.QuantEmbedding) and isinstance(head, Q.QuantHead)
    assert (head.weight is embed.weight) == (kind == "tied") == client.config.tie_word_embeddings
    for mine, theirs in ((embed, sub.get_input_embeddings()), (head, sub.get_output_embeddings())):
        sent = dict(theirs.weight.named_buffers())
        assert {n: t.dtype for n, t in mine.weight.named_buffers()} == {n: t.dtype for n, t in sent.items()}
        assert all(torch.equal(t, sent[n]) for n, t in mine.weight.named_buffers())
    ids, mask = batch()
    with torch.no_grad():
        assert torch.equal(client(ids, attention_mask=mask).logits, sub(ids, attention_mask=mask).logits)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("kind", ["tied", "untied"])
def test_logits_stay_close_to_the_16_bit_table(kind, bits):
    full = full_model(kind)
    plain, sub = (M.build_sub_model(full, KEPT, quantize=True, embed_bits=b) for b in (16, bits))
    ids, mask = batch()
    with torch.no_grad():
        want, got = plain(ids, attention_mask=mask).logits, sub(ids, attention_mask=mask).logits
    err = ((got - want).norm() / want.norm()).item()
    print(f"{kind} {bits} bits: relative logit error {err:.4f}")
    assert 0 < err < LOGIT_TOL[bits]
    table = sub.get_input_embeddings().weight
    exact = full.get_input_embeddings().weight.detach()
    assert torch.equal(table.rows(torch.arange(V)), table.dequantized())  # row lookup = whole-table decode
    row_max = exact.abs().amax(1, keepdim=True)
    # int8: half a step; NF4: about half its widest code gap (1 - 0.723; bitsandbytes' bins measured at <= 0.155)
    bound = row_max / 254 + 1e-6 if bits == 8 else 0.16 * row_max
    assert ((table.dequantized() - exact).abs() <= bound).all()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("kind", ["tied", "untied"])
def test_lora_gradients_flow_through_the_quantized_head(kind, bits):
    """The adapter's LoRA learns through the quantized head: non-zero, finite, aligned with the 16-bit table's
    gradient, unchanged by an eval forward in between (the bitsandbytes CPU trap, models.fix_bnb_cpu)."""
    full = full_model(kind)
    ids, mask = batch()

    def grads(bits: int, eval_first: bool = False) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = M.add_lora(M.build_sub_model(full, KEPT, quantize=True, embed_bits=bits), [2], r=4, dropout=0.0)
        randomize_lora_b(model)
        params = M.set_trainable(model, [2])
        if eval_first:
            with M.mode(model), torch.no_grad():
                model(ids, attention_mask=mask)
        with M.mode(model, training=True):
            model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
        assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
        return {n: p.grad.clone() for n, p in model.named_parameters() if p in set(params)}

    want, got, again = grads(16), grads(bits), grads(bits, eval_first=True)
    assert got.keys() == want.keys() and len(got) == 14
    for name, g in got.items():
        assert torch.isfinite(g).all() and g.abs().sum() > 0, name
        assert torch.allclose(again[name], g, rtol=1e-5, atol=1e-8), name
        cos = torch.nn.functional.cosine_similarity(g.flatten(), want[name].flatten(), dim=0)
        assert cos > (0.99 if bits == 8 else 0.5), (name, cos.item())  # 4 bits move the tiny random model's inputs
        #                                                                 by ~12 %: measured 0.66-0.99


def test_refusals_are_one_line():
    with pytest.raises(Q.EmbedQuantError, match=r"Gemma3TextScaledWordEmbedding.*use quant.embed_bits=16") as e:
        Q.quantize_embeddings(tf.AutoModelForCausalLM.from_config(model_config("gemma3_text", V, 2)), 8)
    assert "\n" not in str(e.value)
    with pytest.raises(Q.EmbedQuantError, match="hidden size 32 is not a multiple of NF4's block of 64"):
        Q.quantize_embeddings(tiny_causal_lm("llama", layers=2, hidden=32), 4)
    Q.quantize_embeddings(tiny_causal_lm("llama", layers=2, hidden=32), 8)  # int8 rows need no blocks
    with pytest.raises(Q.EmbedQuantError, match="needs quant.enabled=true"):
        M.build_sub_model(tiny_causal_lm("llama", layers=2), [0], quantize=False, embed_bits=8)
    with pytest.raises(ConfigError, match=r"^quant.embed_bits: must be 16, 8 or 4 \(8 and 4 need quant.enabled"):
        load_config(None, ["method=fedpetuning", "quant.embed_bits=8"])
    with pytest.raises(ConfigError, match="got 2"):
        load_config(None, ["quant.embed_bits=2"])
    assert load_config(None, ["quant.embed_bits=4"]).quant.embed_bits == 4


@pytest.mark.parametrize("bits", [8, 4])
def test_tables_live_on_the_model_device(bits, tmp_path, virtual_loading):  # noqa: F811
    """Quantized on the server's device (virtual cuda:0), rebuilt on the client's (cuda:1) from the bundle; the
    forward stays on each device and gives the CPU's numbers. (NF4 decoder layers are off in virtual mode.)"""
    torch.manual_seed(0)
    cpu = Q.quantize_embeddings(tiny_causal_lm("llama", layers=2), bits)
    ids = torch.randint(3, V, (2, 5))
    with torch.no_grad():
        want = cpu(ids).logits
    with VirtualCuda():
        server = Q.quantize_embeddings(place(tiny_causal_lm("llama", layers=2), "cuda:0"), bits)
        assert {device_of(t) for t in server.get_input_embeddings().buffers()} == {"cuda:0"}
        client, _ = M.load_bundle(M.model_bundle(server, tiny_tokenizer()), tmp_path / "client", "cuda:1")
        assert virtual_loading == ["cuda:1"]
        assert {device_of(t) for t in client.buffers()} == {"cuda:1"}
        for model, device in ((server, "cuda:0"), (client, "cuda:1")):
            with torch.no_grad():
                out = model(ids.to(device)).logits
            assert device_of(out) == device
            assert torch.equal(out.cpu(), want)


@pytest.mark.mpi
def test_a_three_rank_round_with_a_4_bit_table(tiny_model_dir, tmp_path):
    """mpirun -n 3, one round with quant.embed_bits=4: the server aligns and ships M* with the NF4 table, each client
    stores the bytes it received, run.h5 records the setting and the smaller client model."""
    run_dir = tmp_path / "run"
    p = mpirun(3, ["-m", "fedsoda_mpi.main", f"model.name={tiny_model_dir}", "fed.rounds=1", "fed.clients=2",
                   "fed.local_steps=1", "eval.max_examples=8", "data.public_samples=4", "data.val_size=8",
                   "data.max_train_per_client=8", "quant.embed_bits=4", f"output.dir={run_dir}"], timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    with h5py.File(run_dir / "run.h5", "r") as f:
        assert json.loads(f.attrs["config_json"])["quant"]["embed_bits"] == 4
        fin, kl_after = dict(f["final"].attrs), f["oda/pre"].attrs["kl_after"]
    assert math.isfinite(kl_after) and math.isfinite(fin["accuracy"])
    vocab, hidden = 4096, 64  # tiny.VOCAB, tiny.HIDDEN: the tied table, fp32 = 1 MiB
    for rank in (1, 2):
        held = json.loads((run_dir / f"client_rank{rank}.json").read_text())
        assert held["lm_head_tied"] and held["linear4bit"] == 18 * 7
        assert 0 <= held["stored_bytes"] - held["lora_bytes"] - held["received_weight_bytes"] <= 1024
        assert held["received_weight_bytes"] < 4 * vocab * hidden  # less than the fp32 table alone


def test_the_study_group_pairs_with_fedsoda_main_runs():
    """studies/cpu_smollm2_ii.yaml's smaller_client group: FedSODA at its three-seed selection (the lr of FedSODA's
    main runs), seeds 0-2, one 8-bit and one 4-bit run per seed, nothing else changed."""
    from fedsoda_mpi import study
    from tests.conftest import ROOT

    runs = study.load(ROOT / "studies/cpu_smollm2_ii.yaml").stage("smaller_client")
    assert sorted((r.variant, r.seed) for r in runs) == [(v, s) for v in ("embed4", "embed8") for s in (0, 1, 2)]
    for r in runs:
        assert (r.method, r.lr, r.key, r.lr_step) == ("fedsoda", None, ("fedsoda", "sst2", "smollm2", "iid"), None)
        assert f"quant.embed_bits={r.variant[-1]}" in r.overrides


def test_the_8b_estimate_counts_the_quantized_tables():
    """bench/gpu_memory.py (docs/gpu.md's 8B estimate): LLaMA3-8B's untied embedding and head, 2 x 128256 x 4096
    weights, leave the bundle as bfloat16, int8 rows with a float32 scale per row, or NF4."""
    import importlib.util
    import sys

    from tests.conftest import ROOT

    spec = importlib.util.spec_from_file_location("gpu_memory", ROOT / "bench" / "gpu_memory.py")
    bench = sys.modules.setdefault("gpu_memory", importlib.util.module_from_spec(spec))
    spec.loader.exec_module(bench)
    bundle = {b: bench.host_needs(load_config(str(ROOT / "jobs/llama3_sst2_iid.yaml"), [f"quant.embed_bits={b}"]))
              ["bundle"] for b in (16, 8, 4)}
    table = 128256 * 4096
    assert bundle[16] - bundle[8] == pytest.approx(2 * (2 * table - (table + 4 * 128256)))
    assert bundle[16] - bundle[4] == pytest.approx(2 * table * (2 - bench.NF4_BITS / 8))


def test_a_bundle_without_its_table_is_refused(tmp_path):
    """transformers' report of the missing table is silenced while a bundle loads, so the restore checks it."""
    files = M.model_bundle(M.build_sub_model(full_model("tied"), KEPT, quantize=True, embed_bits=8), tiny_tokenizer())
    from safetensors.torch import load, save

    state = load(bytes(files["model.safetensors"]))
    del state["model.embed_tokens.weight.row_scale"]
    files["model.safetensors"] = save(state, metadata={"format": "pt"})
    with pytest.raises(Q.EmbedQuantError, match="8-bit model.embed_tokens but model.safetensors lacks "
                                                "model.embed_tokens.weight.row_scale"):
        M.load_bundle(files, tmp_path / "client")
