"""Methods as presets of ONE pipeline, and the layer plan the server derives from them.

A method only changes default config values (which layers form the sub-LLM, whether and how often
the sub-LLM is aligned, whether it is quantized); the job file and then the `key=value` overrides apply
on top (config.load_config), so a key set explicitly always wins over the preset and ablations
(`sgp.enabled=false`, `oda.re_align=false`, `quant.enabled=false`, ...) compose with every method.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

# dotted config defaults per method (applied before the job file and the overrides; the shipped job files set none
# of these keys, tests/test_config.py)
PRESETS: dict[str, dict] = {
    # FedSODA: SGP (n=3, p=4) + pre-alignment + re-alignment every r + NF4 QLoRA clients
    "fedsoda": {},
    # The baselines train with plain FedAvg as in the paper (fed.mu = 0; FedSODA's proximal term is its own).
    # FedPETuning: clients hold the full model, LoRA on all layers, no pruning, no alignment
    "fedpetuning": {"model.adapter_layers": 0, "sgp.p": 0, "oda.pre_align": False, "oda.re_align": False,
                    "quant.enabled": False, "fed.mu": 0.0},
    # FedOT (offsite-tuning in FL): adapter = first 1 + last 2 layers, emulator = uniform drop of n*p middle
    # layers (12, as FedSODA prunes), LoRA-distilled once before training (pre-alignment only)
    "fedot": {"model.adapter_first": 1, "model.adapter_layers": 2, "sgp.enabled": False, "oda.re_align": False,
              "quant.enabled": False, "fed.mu": 0.0},
    # FedBiOT: adapter = last 3 layers, the same uniform emulator, re-aligned (and re-sent) every round
    "fedbiot": {"sgp.enabled": False, "oda.every": 1, "quant.enabled": False, "fed.mu": 0.0},
}
METHODS = tuple(PRESETS)  # also the order of the report's tables
NAMES = {"fedsoda": "FedSODA", "fedpetuning": "FedPETuning", "fedot": "FedOT", "fedbiot": "FedBiOT"}  # display names


def layer_maps(kept: Sequence[int]) -> tuple[dict[int, int], dict[int, int]]:
    """(full -> sub, sub -> full) layer-index maps of a sub-LLM keeping the full-model layers `kept` (sorted)."""
    kept = [int(i) for i in kept]
    return {f: s for s, f in enumerate(kept)}, dict(enumerate(kept))


@dataclass
class Plan:
    """Which full-model layers the sub-LLM keeps, which are trained where, and how indices map.

    Sub-LLM layers: [first adapter layers | emulator | last adapter layers]. FedSODA's emulator LoRA sits on
    the retained start layers s_i of the pruned groups (Algorithm 1's map I); uniform-drop emulators
    (FedOT, FedBiOT) put it on every emulator layer."""

    num_layers: int  # L of the full model
    adapter_size: int  # L_A: trainable layers at the top (= L for FedPETuning)
    kept: list[int]  # full-model indices of the sub-LLM's layers, sorted
    groups: list[tuple[int, int]]  # pruned groups (t_i, t_i + n)
    layer_map: list[tuple[int, int]]  # I_i = (t_i, s_i)
    adapter_first: int = 0  # trainable layers at the bottom (FedOT: 1)
    emulator_lora: list[int] = field(default_factory=list)  # sub-LLM layers aligned by ODA

    @property
    def sub_layers(self) -> int:
        return len(self.kept)

    @property
    def emulator_end(self) -> int:
        """Sub-LLM index of the first top-adapter layer (the emulator's output enters it)."""
        return self.sub_layers - self.adapter_size

    @property
    def train_start(self) -> int:
        """First sub-LLM layer with trainable LoRA: client forwards before it are frozen (and cached)."""
        return 0 if self.adapter_first else self.emulator_end

    @property
    def adapter_full(self) -> list[int]:
        return list(range(self.adapter_first)) + list(range(self.num_layers - self.adapter_size, self.num_layers))

    @property
    def adapter_sub(self) -> list[int]:
        return list(range(self.adapter_first)) + list(range(self.emulator_end, self.sub_layers))

    @property
    def emulator_lora_sub(self) -> list[int]:
        return sorted(self.emulator_lora)

    @property
    def lora_sub(self) -> list[int]:
        """Every sub-LLM layer that carries LoRA: the aligned emulator layers and the adapter."""
        return sorted(self.emulator_lora_sub + self.adapter_sub)

    @property
    def full_to_sub(self) -> dict[int, int]:
        return layer_maps(self.kept)[0]

    @property
    def sub_to_full(self) -> dict[int, int]:
        return layer_maps(self.kept)[1]

    @property
    def n(self) -> int:
        """Layers removed per SGP group (t_i, t_i + n): the CHOSEN n (sgp.auto picks it; sgp.n is only the request);
        0 without groups (no pruning, or a uniform drop)."""
        sizes = {end - t for t, end in self.groups}
        if len(sizes) > 1:
            raise ValueError(f"groups {self.groups} do not share one n")
        return sizes.pop() if sizes else 0

    @property
    def p(self) -> int:
        """Number of pruned SGP groups: the CHOSEN p (sgp.auto or sgp.max_distance may change sgp.p)."""
        return len(self.groups)

    @property
    def align_pairs(self) -> list[tuple[int, int]]:
        """(full layer t_i + n, sub layer s_i): the L_inter pairs of eq. 6."""
        return [(t_end, s) for (t, t_end), (_, s) in zip(self.groups, self.layer_map)]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        return cls(d["num_layers"], d["adapter_size"], list(d["kept"]), [tuple(g) for g in d["groups"]],
                   [tuple(m) for m in d["layer_map"]], d.get("adapter_first", 0), list(d.get("emulator_lora", [])))
