"""Methods as presets of ONE pipeline, and the layer plan the server derives from them.

A method only changes default config values (which layers form the sub-LLM, whether and how often
the sub-LLM is aligned, whether it is quantized); the YAML file and `key=value` overrides apply on
top, so ablations (`sgp.enabled=false`, `oda.re_align=false`, `quant.enabled=false`, ...) compose
with every method.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

# dotted config defaults per method (applied before the YAML file and the overrides)
PRESETS: dict[str, dict] = {
    # FedSODA: SGP (n=3, p=4) + pre-alignment + re-alignment every r + NF4 QLoRA clients
    "fedsoda": {},
    # FedPETuning: clients hold the full model, LoRA on all layers, no pruning, no alignment
    "fedpetuning": {"model.adapter_layers": 0, "sgp.p": 0, "oda.pre_align": False, "oda.re_align": False,
                    "quant.enabled": False},
}


@dataclass
class Plan:
    """Which full-model layers the sub-LLM keeps and how they map (Algorithm 1 output + I)."""

    num_layers: int  # L of the full model
    adapter_size: int  # L_A (= L for FedPETuning: every layer is trainable)
    kept: list[int]  # full-model indices of the sub-LLM's layers, sorted
    groups: list[tuple[int, int]]  # pruned groups (t_i, t_i + n)
    layer_map: list[tuple[int, int]]  # I_i = (t_i, s_i)

    @property
    def sub_layers(self) -> int:
        return len(self.kept)

    @property
    def emulator_size(self) -> int:
        return self.sub_layers - self.adapter_size

    @property
    def adapter_full(self) -> list[int]:
        return list(range(self.num_layers - self.adapter_size, self.num_layers))

    @property
    def adapter_sub(self) -> list[int]:
        return list(range(self.emulator_size, self.sub_layers))

    @property
    def emulator_lora_sub(self) -> list[int]:
        """Sub-LLM layers whose LoRA ODA trains: the retained start layers s_i of the pruned groups."""
        return sorted(s for _, s in self.layer_map)

    @property
    def full_to_sub(self) -> dict[int, int]:
        return {f: s for s, f in enumerate(self.kept)}

    @property
    def sub_to_full(self) -> dict[int, int]:
        return dict(enumerate(self.kept))

    @property
    def align_pairs(self) -> list[tuple[int, int]]:
        """(full layer t_i + n, sub layer s_i): the L_inter pairs of eq. 6."""
        return [(t_end, s) for (t, t_end), (_, s) in zip(self.groups, self.layer_map)]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        return cls(d["num_layers"], d["adapter_size"], list(d["kept"]), [tuple(g) for g in d["groups"]],
                   [tuple(m) for m in d["layer_map"]])
