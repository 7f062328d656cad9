"""The strategy interface (fedsoda_mpi/strategy.py): every registered strategy implements it, a new one is a
few lines (the example of docs/design.md runs here), the loss and n_k travel as their own typed message, and
fedsoda_mpi/ has no import cycle."""
import ast
import inspect
from pathlib import Path

import pytest
import torch

from fedsoda_mpi.aggregate import fedavg
from fedsoda_mpi.comm import Schema
from fedsoda_mpi.config import load_config
from fedsoda_mpi.strategies import STRATEGIES, strategy_for
from fedsoda_mpi.strategy import FIT, Strategy, download_size, fit_message, fit_values, payload, traffic, upload_size

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fedsoda_mpi"


class Uniform:
    """FedAvg with every accepted client weighted the same: dense LoRA up and down."""

    def __init__(self, schema, cfg):
        self.schema, self.up = schema, [schema]

    def download_schemas(self, rnd, first): return [self.schema]
    def download(self, global_state, rnd, first): return [global_state]
    def receive(self, msgs, held, rnd, first): return msgs[0]
    def pack_upload(self, local, received): return [local]
    def unpack_upload(self, msgs, received): return {n: t.clone() for n, t in msgs[0].items()}
    def steady_download_size(self): return payload([self.schema])

    def aggregate(self, updates, weights, global_state, rnd):
        return fedavg(updates, [1.0 if w > 0 else 0.0 for w in weights])


def _state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"m.q_proj.lora_A.weight": torch.randn(4, 12, generator=g),
            "m.q_proj.lora_B.weight": torch.randn(10, 4, generator=g)}


def _wire(msgs: list[dict]) -> list[dict]:
    """Messages as comm moves them: packed into one typed buffer by their Schema and unpacked."""
    return [Schema.of(m).unpack(Schema.of(m).pack(m)) for m in msgs]


def test_the_design_docs_example_strategy_is_this_one():
    assert inspect.getsource(Uniform) in (ROOT / "docs" / "design.md").read_text()


def test_a_strategy_in_a_few_lines_runs_through_the_interface():
    """docs/design.md's example: download, receive, upload, aggregate and the byte sizes, through typed buffers."""
    held = _state(0)
    strategy = Uniform(Schema.of(held), cfg=None)
    assert isinstance(strategy, Strategy)
    held = strategy.receive(_wire(strategy.download(held, 1, 1)), None, 1, 1)
    locals_ = [_state(1), _state(2), {k: torch.full_like(v, float("nan")) for k, v in held.items()}]
    updates = [strategy.unpack_upload(_wire(strategy.pack_upload(s, held)), held) for s in locals_]
    new, rejected = strategy.aggregate(updates, [1.0, 9.0, 3.0], held, 1)
    assert rejected == [2] and all(torch.allclose(new[k], (locals_[0][k] + locals_[1][k]) / 2) for k in new)
    dense = sum(t.numel() for t in held.values())
    assert upload_size(strategy) == download_size(strategy, 2, 1) == (dense, 4 * dense)
    assert traffic(strategy) == (2 * dense, 8 * dense)


@pytest.mark.parametrize("aggregator", sorted(STRATEGIES))
def test_every_registered_strategy_implements_the_interface_without_inheritance(aggregator):
    cfg = load_config(None, [f"fed.aggregator={aggregator}"]
                      + ([] if aggregator == "fedavg" else ["fed.upload_density=0.5", "fed.download_density=0.5"]))
    strategy = strategy_for(cfg, Schema.of(_state(0)))
    assert isinstance(strategy, Strategy) and type(strategy).__bases__ == (object,)
    assert all("loss" not in s.names and "n_samples" not in s.names for s in strategy.up)  # only LoRA goes up


def test_loss_and_n_samples_travel_as_their_own_typed_message():
    msg = _wire([fit_message(0.25, 7)])[0]
    assert Schema.of(msg) == FIT and FIT.nbytes == 8 and fit_values(msg) == (0.25, 7.0)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The fedsoda_mpi modules `path` imports, at module level and inside functions (`from . import x`,
    `from .x import y`, `from fedsoda_mpi.x import y`, `import fedsoda_mpi.x`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {a.name for a in node.names} if node.module is None else {node.module.split(".")[0]}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "fedsoda_mpi":
            parts = node.module.split(".")
            found |= {parts[1]} if len(parts) > 1 else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("fedsoda_mpi.")}
    return found & modules


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of `graph` (depth-first search), or []."""
    state, path = {}, []

    def visit(m):
        state[m] = "open"
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        state[m] = "done"
        path.pop()
        return []

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return []


def test_the_cycle_finder_finds_a_function_level_cycle(tmp_path):
    (tmp_path / "a.py").write_text("from .b import f\n")
    (tmp_path / "b.py").write_text("def f():\n    from . import a\n")
    graph = {p.stem: _imports(p, {"a", "b"}) for p in tmp_path.glob("*.py")}
    assert _cycle(graph) == ["a", "b", "a"]


def test_fedsoda_mpi_has_no_import_cycle():
    """Function-level imports count: a deferred import hides a cycle from Python's loader, not from the design."""
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    graph = {m: _imports(PACKAGE / f"{m}.py", modules) - {m} for m in modules}
    assert _cycle(graph) == []
