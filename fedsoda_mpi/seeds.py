"""The seed of every random stream of a run. Every draw of round t is seeded from (seed, t, client) or a fixed
stream number, so the round number is the whole RNG/sampler state: a resumed run reproduces an uninterrupted one
bit for bit (checkpoint.py records RNG_SCHEME in every state.json)."""
from __future__ import annotations

# How every random draw is derived (recorded in state.json; the sampler state is the round number).
RNG_SCHEME = {
    "client_sampling": "numpy default_rng([seed, round])",
    "local_batches": "numpy default_rng([seed, round, client])",
    "local_torch": "torch.manual_seed(seed * 100003 + round * 1009 + client)",
    "re_alignment_sample": "numpy default_rng([seed, round, 7])",
    "re_alignment_torch": "torch.manual_seed(seed * 100003 + round * 1009 + 999983)",
    "data_partition": "numpy default_rng(seed) over the task's training file",
}
REALIGN_STREAM, FEDSRD_STREAM = 999983, 424243  # torch_seed streams that are not a client


def torch_seed(seed: int, rnd: int, stream: int) -> int:
    """The torch seed of one random stream of round `rnd` (RNG_SCHEME): client k's local training (stream k,
    LoRA dropout), the re-alignment (REALIGN_STREAM) and FedSRD's download sparsification (FEDSRD_STREAM)."""
    return seed * 100003 + rnd * 1009 + stream
