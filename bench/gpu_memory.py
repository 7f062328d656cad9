"""Analytic client memory on a GPU (weights + LoRA + AdamW state), FedSODA vs FedPETuning, for the paper's
models. No GPU here, so this is arithmetic from each architecture, checked against what SmolLM2 clients hold.

    python bench/gpu_memory.py [--run runs/NAME]     # --run: also print what that run's clients measured

FedPETuning client: the full model in bf16 + LoRA (r=8, q k v o gate up down) on every layer, trained.
FedSODA client: the sub-LLM (L - n*p layers; the paper's n=3, p=4, 3 adapter layers) with decoder linears in
NF4 with double quantization (4 + 8/64 + 32/(64*256) = 4.127 bits/param), embeddings / LM head / norms in bf16,
LoRA on the 3 adapter layers (trained) + the 4 aligned emulator layers (frozen), fp32 LoRA.
Trained LoRA costs 4 (weight) + 4 (grad) + 8 (AdamW m, v) bytes/param. Activations are left out (they depend on
batch and sequence length, and FedSODA backpropagates through 3 layers instead of L).
The first row recomputes SmolLM2-135M in the dtype it runs here (fp32) and prints it next to the bytes the e2e
test checks a client holding (`stored_bytes` in a run's `client_rank1.json`; pass the run with --run).
"""
import argparse
import json
from pathlib import Path

NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)
MODELS = {  # name: (layers, d_model, d_ff, kv_dim, vocab, tied embeddings)
    "SmolLM2-135M (fp32 here)": (30, 576, 1536, 192, 49152, True),
    "LLaMA3-8B": (32, 4096, 14336, 1024, 128256, False),
    "Qwen2-7B": (28, 3584, 18944, 512, 152064, False),
    "Mistral-7B": (32, 4096, 14336, 1024, 32000, False),
}


def per_layer(d: int, ff: int, kv: int, r: int = 8) -> tuple[int, int, int]:
    """(linear params, norm params, LoRA params) of one decoder layer."""
    linear = 2 * d * d + 2 * d * kv + 3 * d * ff
    lora = r * ((d + d) * 2 + (d + kv) * 2 + (d + ff) * 3)
    return linear, 2 * d, lora


def client_bytes(layers: int, d: int, ff: int, kv: int, vocab: int, tied: bool, fedsoda: bool, dense_bytes: float):
    """Weights + LoRA + optimizer bytes of one client (dense_bytes: 2 for bf16, 4 for fp32)."""
    linear, norms, lora = per_layer(d, ff, kv)
    other = vocab * d * (1 if tied else 2) + d  # embeddings (+ untied head), final norm
    if fedsoda:
        held = layers - 12
        weights = held * linear * NF4_BITS / 8 + (other + held * norms) * dense_bytes
        return weights + (3 + 4) * lora * 4 + 3 * lora * 12
    weights = (layers * (linear + norms) + other) * dense_bytes
    return weights + layers * lora * 16


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default=None, help="a FedSODA run folder of the default job (SmolLM2)")
    args = ap.parse_args()
    gib = 2**30
    print("| model | FedPETuning client GiB | FedSODA client GiB | ratio |\n|---|---:|---:|---:|")
    for name, (L, d, ff, kv, V, tied) in MODELS.items():
        dense = 4 if "fp32" in name else 2
        pet = client_bytes(L, d, ff, kv, V, tied, False, dense)
        soda = client_bytes(L, d, ff, kv, V, tied, True, dense)
        print(f"| {name} | {pet / gib:.2f} | {soda / gib:.3f} | {soda / pet:.3f} |")
    L, d, ff, kv, V, tied = MODELS["SmolLM2-135M (fp32 here)"]
    linear, norms, lora = per_layer(d, ff, kv)
    held = 18 * linear * NF4_BITS / 8 + (V * d + d + 18 * norms) * 4 + 7 * lora * 4
    print(f"\nSmolLM2 FedSODA client, weights + held LoRA by formula: {held / 2**20:.1f} MiB")
    if args.run:
        got = json.loads((Path(args.run) / "client_rank1.json").read_text())["stored_bytes"]
        print(f"measured in {args.run}/client_rank1.json: {got / 2**20:.1f} MiB (ratio {got / held:.4f})")


if __name__ == "__main__":
    main()
