"""Bad input is stopped before any MPI work with one line naming the key or file (issue 15, item 1).

Most cases call `load_config`, `prepare_config` or `prepare_inputs` in-process on a tiny model folder (config.json,
a copy of the BPE tokenizer of `tiny_model_dir`, zero weights of the config's shapes: nothing here loads weights) and a
tiny data folder (FEDSODA_DATA); one case runs a real `mpirun` to show the line, the exit code 2 and that no
traceback is printed."""
import dataclasses
import json
import math
import shutil
from typing import Literal

import pytest

from fedsoda_mpi import config as C
from fedsoda_mpi import validation as V
from fedsoda_mpi.config import Config, ConfigError, load_config
from fedsoda_mpi.data import FIX, DataError
from fedsoda_mpi.main import prepare_config, prepare_inputs
from fedsoda_mpi.models import ModelError
from tests.conftest import mpirun

TINY_CONFIG = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128, hidden_size=32,
                   intermediate_size=64, num_hidden_layers=24, num_attention_heads=4, num_key_value_heads=2,
                   max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
WORDS = " ".join(f"word{i}" for i in range(20))  # a WikiText paragraph long enough for the public pool


@pytest.fixture
def tiny_model(tmp_path, tiny_model_dir):
    """A 24-layer llama folder that passes every pre-MPI model check (no real weights)."""
    from safetensors.torch import save_file

    folder = tmp_path / "tiny-llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(TINY_CONFIG))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, folder / name)
    save_file(zero_weights(folder), str(folder / "model.safetensors"))
    return folder


def zero_weights(folder) -> dict:
    """Zero tensors of every name and shape the config.json in `folder` describes (a tied head stored once)."""
    import torch
    from fedsoda_mpi.model_folder import _skeleton

    skeleton = _skeleton(folder)
    return {k: torch.zeros(v.shape) for k, v in skeleton.state_dict().items()
            if not (k == "lm_head.weight" and skeleton.config.tie_word_embeddings)}


@pytest.fixture
def tiny_data(tmp_path, monkeypatch):
    """A data folder with 40 SST-2 training rows, 8 test rows and a small WikiText file; FEDSODA_DATA points to it."""
    root = tmp_path / "data"
    (root / "sst2").mkdir(parents=True)
    (root / "wikitext2").mkdir()
    rows = [json.dumps({"sentence": f"this is training sentence number {i} of a small test set", "label": i % 2})
            for i in range(40)]  # >= 10 words: SST-2 validation rows are sentences (data.VAL_MIN_WORDS)
    (root / "sst2" / "train.jsonl").write_text("\n".join(rows) + "\n")
    (root / "sst2" / "test.jsonl").write_text("\n".join(rows[:8]) + "\n")
    (root / "wikitext2" / "test.txt").write_text("\n".join([" = Heading = "] + [WORDS] * 20) + "\n")
    monkeypatch.setenv("FEDSODA_DATA", str(root))
    return root


def args_for(model, run_dir, *extra):
    return [f"model.name={model}", f"output.dir={run_dir}", "data.val_size=4", *extra]


def one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg
    return msg


# ------------------------------------------------------------------------------------------- config files

def test_yaml_with_a_non_utf8_byte_names_file_and_line(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_bytes(b"fed:\n  rounds: 2 # caf\xe9\n")
    with pytest.raises(ConfigError) as e:
        load_config(job)
    assert one_line(e) == f"{job}:2: not UTF-8 text (byte 0xe9); save the file as UTF-8"


@pytest.mark.parametrize("text", ["", "# only a comment\n", "---\n"])
def test_empty_yaml_is_refused(tmp_path, text):
    job = tmp_path / "job.yaml"
    job.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(job)
    assert one_line(e) == (f"{job}: is empty (no settings); give it at least one key, or leave out --config to run "
                           "the default job smollm2_sst2_iid.yaml")


def test_key_given_twice_in_yaml_names_key_file_and_lines(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("fed:\n  rounds: 2\n  lr: 0.001\n  rounds: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(job)
    assert one_line(e) == f"{job}:4: key 'fed.rounds' is given twice (first on line 2); keep one"
    job.write_text("seed: 1\nseed: 2\n")
    with pytest.raises(ConfigError, match=r"job.yaml:2: key 'seed' is given twice \(first on line 1\)"):
        load_config(job)
    job.write_text("fed:\n  rounds: 2\nfed.rounds: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(job)
    assert one_line(e) == f"{job}: key 'fed.rounds' is given twice (once nested, once dotted); keep one"
    job.write_text("fed:\n  rounds: 2\neval:\n  rounds_unused: 1\n")  # the same leaf name in two sections is fine
    with pytest.raises(ConfigError, match="unknown config key 'eval.rounds_unused'"):
        load_config(job)


def test_yaml_anchors_and_the_shipped_jobs_still_load(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("fed: &f\n  rounds: 2\n")
    assert load_config(job).fed.rounds == 2
    for path in sorted(C.DEFAULT_JOB.parent.glob("*.yaml")):
        load_config(path)


# ------------------------------------------------------------------------------------------- config keys

@pytest.mark.parametrize("arg,msg", [
    ("seed=-1", "seed: must be in [0, 2**32), got -1"),
    ("data.max_train_per_client=-1", "data.max_train_per_client: must be >= 0, got -1"),
    ("eval.batch_size=0", "eval.batch_size: must be >= 1, got 0"),
    ("oda.batch_size=0", "oda.batch_size: must be >= 1, got 0"),
    ("lora.dropout=1.5", "lora.dropout: must be in [0, 1), got 1.5"),
    ("lora.dropout=1", "lora.dropout: must be in [0, 1), got 1.0"),
    ("lora.alpha=0", "lora.alpha: must be > 0, got 0"),
    ("fed.lr=inf", "fed.lr: must be a finite number, got inf"),
    ("fed.lr=nan", "fed.lr: must be a finite number, got nan"),
    ("fed.lr=0", "fed.lr: must be > 0, got 0.0"),
    ("oda.lr=-1e-4", "oda.lr: must be > 0, got -0.0001"),
    ("oda.lr=inf", "oda.lr: must be a finite number, got inf"),
    ("fed.mu=inf", "fed.mu: must be a finite number, got inf"),
    ("oda.alpha=nan", "oda.alpha: must be a finite number, got nan"),
    ("oda.beta=-1", "oda.beta: must be >= 0, got -1.0"),
    ("data.dirichlet_beta=inf", "data.dirichlet_beta: must be a finite number, got inf"),
    ("sgp.n_max=2", "sgp.n_max: must be 0 (automatic) or >= sgp.n (3), got 2"),
    ("oda.re_samples=0", "oda.re_samples: must be >= 1, got 0"),
    ("eval.max_new_tokens=0", "eval.max_new_tokens: must be >= 1, got 0"),
    ("data.public_max_len=4", "data.public_max_len: must be >= 8, got 4"),
    ("model.name=", "model.name: must name a prepared model or a model folder, got ''"),
    ("model.dtype=int8", "model.dtype: expected float32, bfloat16 or float16, got 'int8'"),
    ("oda.trigger=kl", "oda.trigger: expected every or drift, got 'kl'"),
    ("oda.drift_threshold=1", "oda.drift_threshold: the ratio tau must be > 1, got 1.0"),
    ("oda.drift_threshold=0.5", "oda.drift_threshold: the ratio tau must be > 1, got 0.5"),
    ("oda.drift_threshold=inf", "oda.drift_threshold: must be a finite number, got inf"),
    ("oda.max_interval=-1", "oda.max_interval: must be >= 0, got -1"),
    ("fed.stall_timeout=2", "fed.stall_timeout: must be 0 (never) or >= 5 seconds (heartbeats come every tenth of it), "
                            "got 2.0"),
    ("sgp.p=0", "sgp.p=0 with method=fedsoda: the plan removes no layer, so the clients' sub-LLM is the whole emulator "
                "(nothing compressed, nothing for ODA to align); give sgp.p >= 1, use method=fedpetuning for an "
                "uncompressed baseline, or set debug.allow_degenerate=true to run it anyway"),
])
def test_bad_key_names_that_key(arg, msg):
    with pytest.raises(ConfigError) as e:
        load_config(None, [arg])
    assert one_line(e) == msg


def test_a_degenerate_setting_runs_when_allowed():
    """debug.allow_degenerate=true lets a legal but meaningless setting through (here: an emulator method that
    prunes nothing); FedPETuning's own sgp.p=0 needs no confirmation."""
    for method in ("fedsoda", "fedot", "fedbiot"):
        assert load_config(None, [f"method={method}", "sgp.p=0", "debug.allow_degenerate=true"]).sgp.p == 0
    assert load_config(None, ["method=fedpetuning"]).sgp.p == 0


AUTO = ["sgp.auto=true", "sgp.remove_layers=12"]


@pytest.mark.parametrize("args,msg", [
    (["sgp.auto=true"], "sgp.remove_layers: sgp.auto=true needs the number K of emulator layers to remove (>= 1; it "
                        "chooses n and p with n * p = K), got 0"),
    (["sgp.remove_layers=12"], "sgp.remove_layers=12: only sgp.auto=true uses it; set sgp.auto=true, or give the "
                               "groups with sgp.n and sgp.p"),
    ([*AUTO, "sgp.n=2"], "sgp.n=2: sgp.auto=true chooses n and p (n * p = sgp.remove_layers=12); leave sgp.n at 3, "
                         "or set sgp.auto=false"),
    ([*AUTO, "sgp.p=6"], "sgp.p=6: sgp.auto=true chooses n and p (n * p = sgp.remove_layers=12); leave sgp.p at 4, "
                         "or set sgp.auto=false"),
    ([*AUTO, "method=fedot"], "sgp.auto=true: chooses SGP groups from the distance profile, but sgp.enabled=false "
                              "drops layers uniformly (e.g. method=fedot, fedbiot); set sgp.enabled=true or "
                              "sgp.auto=false"),
    ([*AUTO, "method=fedpetuning"], "sgp.auto=true: sgp.p=0 turns pruning off (e.g. method=fedpetuning); use "
                                    "method=fedsoda or sgp.auto=false"),
    (["sgp.max_distance=1.5"], "sgp.max_distance: must be in [0, 1] (an angular distance; 0 = off), got 1.5"),
    (["sgp.max_distance=0.2", "method=fedbiot"], "sgp.max_distance=0.2: caps SGP's group distances, but "
                                                 "sgp.enabled=false drops layers uniformly (no distance profile)"),
    (["sgp.max_distance=0.2", "method=fedpetuning"], "sgp.max_distance=0.2: caps SGP's group distances, but "
                                                      "sgp.p=0 turns pruning off (e.g. method=fedpetuning); use "
                                                      "method=fedsoda"),
    (["oda.max_interval=5"], "oda.max_interval=5: applies to oda.trigger=drift only (oda.trigger=every re-aligns "
                             "every oda.every rounds); set oda.trigger=drift, or leave oda.max_interval at 0"),
    (["data.public=self", "data.self_temperature=0"], "data.self_temperature: must be > 0 (sampling), got 0.0"),
    (["data.public=none"], "data.public: expected wikitext2, gsm8k or self, got 'none'"),
    (["oda.alpha=0", "oda.beta=0"], "oda.alpha=0 and oda.beta=0: the alignment loss (eq. 8) is 0, so M* would ship "
                                    "unaligned; set one of them > 0, or turn alignment off with oda.pre_align=false "
                                    "oda.re_align=false"),
])
def test_auto_sgp_and_self_public_keys_name_the_key(args, msg):
    with pytest.raises(ConfigError) as e:
        load_config(None, args)
    assert one_line(e) == msg


@pytest.mark.parametrize("args,msg", [
    (["sgp.auto=true", "sgp.remove_layers=27"], "sgp.remove_layers=27: no n * p = 27 fits the 27-layer emulator "
                                                "(p groups of n + 1 layers need p * (n + 1) <= 27)"),
    (["sgp.auto=true", "sgp.remove_layers=17", "sgp.n_max=8"],
     "sgp.remove_layers=17: no n * p = 17 and n <= sgp.n_max=8 fits the 27-layer emulator (p groups of n + 1 "
     "layers need p * (n + 1) <= 27)"),
])
def test_auto_needs_a_feasible_n_p_for_the_model(args, msg):
    cfg = load_config(None, args)  # fine without the model ...
    with pytest.raises(ConfigError) as e:  # ... but not for a 30-layer model with 3 adapter layers
        V.validate(cfg, num_layers=30)
    assert one_line(e) == msg


def test_auto_and_self_public_configs_that_are_fine():
    for args in ([*AUTO], [*AUTO, "sgp.n_max=4", "sgp.max_distance=0.2"], ["sgp.auto=true", "sgp.remove_layers=26"],
                 ["sgp.auto=true", "sgp.remove_layers=17"], ["sgp.max_distance=0.1"], ["data.public=self"],
                 [*AUTO, "data.public=self", "data.self_max_new_tokens=8", "data.self_batch_size=2"]):
        V.validate(load_config(None, args), num_layers=30)


def test_self_public_needs_no_public_file(tiny_model, tmp_path, monkeypatch):
    """data.public=self reads no public file before MPI work (rank 0 generates the texts later)."""
    cfg = prepare_config(args_for(tiny_model, tmp_path / "run", "data.public=self", "data.val_size=0",
                                  "data.max_train_per_client=1", "fed.clients=2"), world_size=3)
    monkeypatch.setattr("fedsoda_mpi.data.load_public", lambda *a, **k: pytest.fail("read a public file"))
    prepare_inputs(cfg)


def numeric_keys() -> list[tuple[str, type]]:
    keys = []

    def walk(obj, prefix):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                keys.append((f"{prefix}{f.name}", type(value)))
    walk(Config(), "")
    return keys


@pytest.mark.parametrize("key,choices", sorted(V.choice_keys(Config()).items()))
def test_every_choice_key_refuses_a_value_outside_its_literal_type(key, choices):
    """A choice key (a `Literal` field) refuses any other value with one line naming the key and its choices."""
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"{key}=bogus"])
    assert one_line(e).startswith(f"{key}: ") and all(c in one_line(e) for c in choices), str(e.value)


def test_the_choices_are_the_arguments_of_the_literal_type():
    @dataclasses.dataclass
    class Section:
        mode: Literal["a", "b"] = "a"

    @dataclasses.dataclass
    class Top:
        sec: Section = dataclasses.field(default_factory=Section)

    assert V.choice_keys(Top()) == {"sec.mode": ("a", "b")}
    V._one_of(Top(), "sec.mode")
    with pytest.raises(ConfigError, match=r"^sec.mode: expected a or b, got 'c'$"):
        V._one_of(Top(Section("c")), "sec.mode")


@pytest.mark.parametrize("key,typ", numeric_keys())
def test_every_numeric_key_has_a_range_check(key, typ):
    """-5 is out of range for every int and float key, and a float key refuses inf and nan: the message names the
    key."""
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"{key}=-5"])
    assert one_line(e).startswith(f"{key}: "), str(e.value)
    if typ is float:
        for bad in ("inf", "-inf", "nan"):
            with pytest.raises(ConfigError) as e:
                load_config(None, [f"{key}={bad}"])
            assert one_line(e) == f"{key}: must be a finite number, got {float(bad)}"


def test_numeric_keys_cover_every_float():
    floats = {k for k, t in numeric_keys() if t is float}
    assert {"fed.lr", "oda.lr", "fed.mu", "oda.alpha", "oda.beta", "data.dirichlet_beta", "lora.dropout"} <= floats
    assert all(math.isfinite(v) for k, v in C.flatten(Config().to_dict()).items() if k in floats)


def test_drift_trigger_needs_re_alignment():
    """oda.trigger=drift decides WHEN to re-align: with oda.re_align=false (also the FedPETuning and FedOT presets)
    it is a contradiction, refused with one line; trigger=every with re_align=false stays the ablation 'never'."""
    msg = ("oda.trigger=drift: re-alignment is off (oda.re_align=false); "
           "set oda.re_align=true, or leave oda.trigger=every")
    for args in (["oda.trigger=drift", "oda.re_align=false"], ["method=fedot", "oda.trigger=drift"]):
        with pytest.raises(ConfigError) as e:
            load_config(None, args)
        assert one_line(e) == msg
    load_config(None, ["oda.re_align=false"])
    cfg = load_config(None, ["oda.trigger=drift", "oda.drift_threshold=1.5", "oda.max_interval=5"])
    assert (cfg.oda.trigger, cfg.oda.drift_threshold, cfg.oda.max_interval) == ("drift", 1.5, 5)


def test_debug_fail_rank_must_be_a_rank():
    cfg = load_config(None, ["debug.fail_rank=3"])
    with pytest.raises(ConfigError) as e:
        V.validate(cfg, world_size=3)
    assert one_line(e) == "debug.fail_rank: must be -1 (none) or a rank below the world size 3, got 3"
    V.validate(load_config(None, ["debug.fail_rank=2"]), world_size=3)


def test_lora_target_modules_are_checked_against_the_model(tiny_model, tmp_path):
    with pytest.raises(ConfigError) as e:
        prepare_config(args_for(tiny_model, tmp_path / "run", "lora.target_modules=q_proj,foo_proj"), world_size=3)
    assert one_line(e) == ("lora.target_modules: 'foo_proj' is not a Linear layer of the model's decoder layers "
                           "(choose from down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj), "
                           "got q_proj,foo_proj")
    with pytest.raises(ConfigError, match="'lm_head' is not a Linear layer of the model's decoder layers"):
        prepare_config(args_for(tiny_model, tmp_path / "run", "lora.target_modules=lm_head"), world_size=3)
    cfg = prepare_config(args_for(tiny_model, tmp_path / "run", "lora.target_modules=self_attn.q_proj,v_proj"),
                         world_size=3)
    assert cfg.lora.target_modules == ["self_attn.q_proj", "v_proj"]


# ------------------------------------------------------------------------------------------- model folder

def test_a_good_tiny_model_folder_passes(tiny_model, tiny_data, tmp_path):
    cfg = prepare_config(args_for(tiny_model, tmp_path / "run"), world_size=3)
    rows, hist = prepare_inputs(cfg)
    assert len(rows) == cfg.fed.clients and sum(map(len, rows)) == 36
    assert not (tmp_path / "run").exists()  # validation creates nothing


def test_config_json_cut_in_half(tiny_model, tmp_path):
    text = (tiny_model / "config.json").read_text()
    (tiny_model / "config.json").write_text(text[:len(text) // 2])
    with pytest.raises(ModelError) as e:
        prepare_config(args_for(tiny_model, tmp_path / "run"), world_size=3)
    assert one_line(e).startswith(f"{tiny_model}/config.json: not valid JSON (")
    assert one_line(e).endswith("); delete the folder and run `python -m fedsoda_mpi.prepare model ...` again")


@pytest.mark.parametrize("change,msg", [
    (dict(num_hidden_layers=None), "has no num_hidden_layers"),
    (dict(num_hidden_layers="24"), "num_hidden_layers must be an integer >= 1, got '24'"),
    (dict(model_type="gpt2", architectures=["GPT2LMHeadModel"]),
     "model_type 'gpt2' (GPT2LMHeadModel) is not supported: no single decoder layer list at `model.layers` (its "),
    (dict(model_type=None), "model_type None (LlamaForCausalLM) is not supported"),
])
def test_config_json_fields(tiny_model, tmp_path, change, msg):
    config = {k: v for k, v in {**TINY_CONFIG, **change}.items() if v is not None}
    (tiny_model / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError) as e:
        prepare_config(args_for(tiny_model, tmp_path / "run"), world_size=3)
    assert one_line(e).startswith(f"{tiny_model}/config.json: {msg}")


def test_config_json_that_is_not_an_object(tiny_model, tmp_path):
    (tiny_model / "config.json").write_text("[]")
    with pytest.raises(ModelError, match=r"config.json: expected a JSON object, got list"):
        prepare_config(args_for(tiny_model, tmp_path / "run"), world_size=3)


def test_missing_tokenizer_files(tiny_model, tmp_path):
    (tiny_model / "tokenizer.json").unlink()
    with pytest.raises(ModelError) as e:
        prepare_config(args_for(tiny_model, tmp_path / "run"), world_size=3)
    assert one_line(e) == (f"model folder {tiny_model} has no tokenizer (none of tokenizer.json, tokenizer.model, "
                           "vocab.json); delete the folder and run `python -m fedsoda_mpi.prepare model ...` again")


def test_damaged_tokenizer(tiny_model, tmp_path):
    (tiny_model / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(ModelError) as e:
        prepare_config(args_for(tiny_model, tmp_path / "run"), world_size=3)
    assert one_line(e).startswith(f"model folder {tiny_model}: the tokenizer cannot be loaded (")


def edited_copy(src, dest, **changes):
    """A copy of the model folder `src` whose config.json has `changes` applied (the weights untouched)."""
    shutil.copytree(src, dest)
    config = json.loads((dest / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps({**config, **changes}))
    return dest


REPREPARE = "delete the folder and run `python -m fedsoda_mpi.prepare model ...` again"


def model_error(folder, tmp_path) -> str:
    """The one-line ModelError that prepare_inputs gives for the model folder `folder`."""
    cfg = prepare_config(args_for(folder, tmp_path / "run"), world_size=3)
    with pytest.raises(ModelError) as e:
        prepare_inputs(cfg)
    return one_line(e)


@pytest.mark.parametrize("layers", [20, 40])
def test_config_json_layer_count_that_disagrees_with_the_weights(tiny_model_dir, tiny_data, tmp_path, layers):
    bad = edited_copy(tiny_model_dir, tmp_path / "m", num_hidden_layers=layers)  # over 30-layer weights
    assert model_error(bad, tmp_path) == (f"{bad}/config.json: num_hidden_layers is {layers} "
                           "but the weights hold 30 decoder "
                           f"layers; set num_hidden_layers to 30, or {REPREPARE}")


def test_config_json_untied_head_without_lm_head_weights(tiny_model_dir, tiny_data, tmp_path):
    bad = edited_copy(tiny_model_dir, tmp_path / "m", tie_word_embeddings=False)  # the tied llama stores no head
    assert model_error(bad, tmp_path) == (f"{bad}/config.json: tie_word_embeddings is false "
                           "but the weights have no lm_head.weight "
                           f"(the output head would be random); set tie_word_embeddings to true, or {REPREPARE}")


@pytest.mark.parametrize("change, name, have, want", [
    ({"intermediate_size": 128}, "model.layers.0.mlp.gate_proj.weight", [256, 64], [128, 64]),
    ({"vocab_size": 5000}, "model.embed_tokens.weight", [4096, 64], [5000, 64]),
])
def test_config_json_shapes_that_disagree_with_the_weights(tiny_model_dir, tiny_data, tmp_path, change, name, have,
                                                           want):
    bad = edited_copy(tiny_model_dir, tmp_path / "m", **change)
    assert model_error(bad, tmp_path) == (f"{bad}/model.safetensors: {name} has shape {have} "
                           f"but config.json {bad}/config.json "
                           f"gives {want}; {REPREPARE}")


def test_weights_lacking_a_tensor_are_named(tiny_model_dir, tiny_data, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = edited_copy(tiny_model_dir, tmp_path / "m")
    tensors = load_file(str(bad / "model.safetensors"))
    del tensors["model.norm.weight"]
    save_file(tensors, str(bad / "model.safetensors"))
    cfg = prepare_config(args_for(bad, tmp_path / "run"), world_size=3)
    with pytest.raises(ModelError) as e:
        prepare_inputs(cfg)
    assert one_line(e) == f"{bad}: the weights lack model.norm.weight, which config.json's model has; {REPREPARE}"


def test_tied_and_untied_model_folders_that_agree_pass(tiny_model_dir, tiny_qwen2_dir, tiny_data, tmp_path):
    for folder in (tiny_model_dir, tiny_qwen2_dir):  # tied llama (no lm_head.weight), untied qwen2 (its own head)
        prepare_inputs(prepare_config(args_for(folder, tmp_path / "run"), world_size=3))


def test_layer_count_comes_from_the_checked_config(tiny_model):
    from fedsoda_mpi.model_folder import check_model_folder

    assert check_model_folder(tiny_model) == 24
    (tiny_model / "config.json").write_text("{")
    with pytest.raises(ModelError, match="config.json: not valid JSON"):
        check_model_folder(tiny_model)


# ------------------------------------------------------------------------------------------- run folder

def test_output_dir_that_is_a_file(tiny_model, tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(ConfigError) as e:
        prepare_config(args_for(tiny_model, f), world_size=3)
    assert one_line(e) == f"output.dir: must name a folder for the run, got the file {f}"
    with pytest.raises(ConfigError) as e:
        prepare_config(args_for(tiny_model, f / "sub" / "run"), world_size=3)
    assert one_line(e) == f"output.dir: cannot create the run folder {f}/sub/run: {f} is a file"


def test_output_dir_that_cannot_be_written(tiny_model, tmp_path, monkeypatch):
    ro = tmp_path / "readonly"
    ro.mkdir()
    real_access = V.os.access
    monkeypatch.setattr(V.os, "access", lambda p, mode: False if str(p) == str(ro) else real_access(p, mode))
    with pytest.raises(ConfigError) as e:
        prepare_config(args_for(tiny_model, ro), world_size=3)
    assert one_line(e) == f"output.dir: the run folder must be writable, got {ro}"
    with pytest.raises(ConfigError) as e:
        prepare_config(args_for(tiny_model, ro / "a" / "b"), world_size=3)
    assert one_line(e) == f"output.dir: cannot create the run folder {ro}/a/b: {ro} is not writable"
    with pytest.raises(ConfigError, match=r"^output.root: cannot create the run folder .*readonly/x/myrun"):
        prepare_config([f"model.name={tiny_model}", f"output.root={ro}/x", "output.name=myrun"], world_size=3)
    assert not (ro / "a").exists()


# ------------------------------------------------------------------------------------------- cache folder

def test_cache_dir_that_is_a_file_or_not_writable(tiny_model, tmp_path, monkeypatch):
    """fed.cache_dir (the emulator cache's disk tier) must be a writable folder, or creatable: one line naming
    the key, before any MPI work."""
    f = tmp_path / "afile"
    f.write_text("x")
    run = tmp_path / "run"
    with pytest.raises(ConfigError) as e:
        prepare_config(args_for(tiny_model, run, f"fed.cache_dir={f}", "fed.cache_max_gb=1"), world_size=3)
    assert one_line(e) == f"fed.cache_dir: must name a folder for the emulator cache, got the file {f}"
    with pytest.raises(ConfigError) as e:
        prepare_config(args_for(tiny_model, run, f"fed.cache_dir={f}/sub", "fed.cache_max_gb=1"), world_size=3)
    assert one_line(e) == f"fed.cache_dir: cannot create the emulator cache folder {f}/sub: {f} is a file"
    ro = tmp_path / "readonly"
    ro.mkdir()
    real_access = V.os.access
    monkeypatch.setattr(V.os, "access", lambda p, mode: False if str(p) == str(ro) else real_access(p, mode))
    with pytest.raises(ConfigError) as e:
        prepare_config(args_for(tiny_model, run, f"fed.cache_dir={ro}", "fed.cache_max_gb=1"), world_size=3)
    assert one_line(e) == f"fed.cache_dir: the emulator cache folder must be writable, got {ro}"
    with pytest.raises(ConfigError) as e:
        prepare_config(args_for(tiny_model, run, f"fed.cache_dir={ro}/a", "fed.cache_max_gb=1"), world_size=3)
    assert one_line(e) == f"fed.cache_dir: cannot create the emulator cache folder {ro}/a: {ro} is not writable"
    # the default is the job's scratch: the message says where the folder came from
    monkeypatch.setenv("SLURM_TMPDIR", str(ro))
    with pytest.raises(ConfigError) as e:
        prepare_config(args_for(tiny_model, run, "fed.cache_max_gb=1"), world_size=3)
    assert one_line(e) == ("fed.cache_dir (default: $SLURM_TMPDIR): the emulator cache folder must be writable, "
                           f"got {ro}")
    # no disk tier, no check; a new folder under a writable one is fine (each rank creates its own subfolder)
    prepare_config(args_for(tiny_model, run, f"fed.cache_dir={ro}", "fed.cache_max_gb=0"), world_size=3)
    prepare_config(args_for(tiny_model, run, f"fed.cache_dir={ro}"), world_size=3)  # the default: no disk tier
    prepare_config(args_for(tiny_model, run, f"fed.cache_dir={ro}", "fed.emulator_cache=false", "fed.cache_max_gb=1"),
                   world_size=3)
    cfg = prepare_config(args_for(tiny_model, run, f"fed.cache_dir={tmp_path}/new/cache", "fed.cache_max_gb=1"),
                         world_size=3)
    assert cfg.fed.cache_dir == f"{tmp_path}/new/cache" and not (tmp_path / "new").exists()


def test_cache_max_gb_must_be_a_size():
    for raw, msg in (("-1", "fed.cache_max_gb: must be >= 0, got -1.0"),
                     ("inf", "fed.cache_max_gb: must be a finite number, got inf"),
                     ("4GB", "fed.cache_max_gb: expected a number, got '4GB'")):
        with pytest.raises(ConfigError) as e:
            load_config(None, [f"fed.cache_max_gb={raw}"])
        assert one_line(e) == msg
    assert load_config(None, ["fed.cache_max_gb=0"]).fed.cache_max_gb == 0.0


# ------------------------------------------------------------------------------------------- data files

def test_empty_train_file(tiny_model, tiny_data, tmp_path):
    (tiny_data / "sst2" / "train.jsonl").write_text("\n")
    cfg = prepare_config(args_for(tiny_model, tmp_path / "run"), world_size=3)
    with pytest.raises(DataError) as e:
        prepare_inputs(cfg)
    assert one_line(e) == f"{tiny_data}/sst2/train.jsonl: is empty (no rows); {FIX}"


def test_empty_test_file(tiny_model, tiny_data, tmp_path):
    (tiny_data / "sst2" / "test.jsonl").write_text("")
    cfg = prepare_config(args_for(tiny_model, tmp_path / "run"), world_size=3)
    with pytest.raises(DataError) as e:
        prepare_inputs(cfg)
    assert one_line(e) == f"{tiny_data}/sst2/test.jsonl: is empty (no rows); {FIX}"


def test_non_utf8_byte_in_train_file_names_file_and_line(tiny_model, tiny_data, tmp_path):
    path = tiny_data / "sst2" / "train.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    lines[2] = b'{"sentence": "caf\xe9", "label": 1}\n'
    path.write_bytes(b"".join(lines))
    cfg = prepare_config(args_for(tiny_model, tmp_path / "run"), world_size=3)
    with pytest.raises(DataError) as e:
        prepare_inputs(cfg)
    assert one_line(e) == f"{path}:3: not UTF-8 text (byte 0xe9 at column 18); {FIX}"


def test_non_utf8_byte_in_the_public_text(tiny_model, tiny_data, tmp_path):
    path = tiny_data / "wikitext2" / "test.txt"
    path.write_bytes(path.read_bytes() + b"\xff\n")
    cfg = prepare_config(args_for(tiny_model, tmp_path / "run"), world_size=3)
    with pytest.raises(DataError) as e:
        prepare_inputs(cfg)
    assert one_line(e) == f"{path}:22: not UTF-8 text (byte 0xff at column 1); {FIX}"


@pytest.mark.parametrize("paragraphs", [0, 5, 9])
def test_a_public_file_too_short_to_hold_out_text_is_one_line(tiny_model, tiny_data, tmp_path, paragraphs):
    """5 paragraphs held out none (round(0.5) = 0): an IndexError on the drift probe after the model was loaded."""
    path = tiny_data / "wikitext2" / "test.txt"
    path.write_text("\n".join([" = Heading = "] + [WORDS] * paragraphs + ["too short"]) + "\n")
    cfg = prepare_config(args_for(tiny_model, tmp_path / "run"), world_size=3)
    with pytest.raises(DataError) as e:
        prepare_inputs(cfg)
    assert one_line(e) == (f"public dataset wikitext2: {tiny_data}/wikitext2/test.txt gives {paragraphs} paragraphs "
                           "of >= 16 words (headings skipped); need at least 10 (the last tenth is held out for "
                           f"KL(M || M*) and the drift probe); {FIX}")
    path.write_text("\n".join([WORDS] * 10) + "\n")
    prepare_inputs(cfg)


def test_a_too_short_max_len_is_one_line(tiny_model, tiny_data, tmp_path):
    for key in ("data.max_len", "eval.max_len"):
        with pytest.raises(ConfigError) as e:
            prepare_config(args_for(tiny_model, tmp_path / "run", f"{key}=16"), world_size=3)
        assert one_line(e).startswith(f"{key}=16: the sst2 prompt template, 8 tokens of text and the answer need ")
        assert one_line(e).endswith(" tokens of this model's tokenizer; set " + key + " >= " +
                                    one_line(e).rsplit(">= ", 1)[1])


def test_more_clients_or_validation_rows_than_training_rows(tiny_model, tiny_data, tmp_path):
    train = tiny_data / "sst2" / "train.jsonl"
    cfg = prepare_config(args_for(tiny_model, tmp_path / "run", "fed.clients=37"), world_size=3)
    with pytest.raises(ConfigError) as e:
        prepare_inputs(cfg)
    assert one_line(e) == (f"fed.clients: must be at most the 36 training rows of {train} (after data.val_size=4), "
                           "got 37")
    cfg = prepare_config(args_for(tiny_model, tmp_path / "run", "data.val_size=40"), world_size=3)
    with pytest.raises(ConfigError) as e:
        prepare_inputs(cfg)
    assert one_line(e) == f"data.val_size: must be smaller than the 40 rows of {train}, got 40"


def test_more_gsm8k_shots_than_training_rows(tiny_model, tiny_data, tmp_path):
    (tiny_data / "gsm8k").mkdir()
    rows = [json.dumps({"question": f"q{i}?", "answer": f"step\n#### {i}"}) for i in range(3)]
    (tiny_data / "gsm8k" / "train.jsonl").write_text("\n".join(rows) + "\n")
    (tiny_data / "gsm8k" / "test.jsonl").write_text(rows[0] + "\n")
    args = args_for(tiny_model, tmp_path / "run", "data.task=gsm8k", "data.val_size=0", "fed.clients=2")
    cfg = prepare_config([*args, "eval.k_shot=4"], world_size=3)
    with pytest.raises(ConfigError) as e:
        prepare_inputs(cfg)
    assert one_line(e) == (f"eval.k_shot: must be at most the 3 training rows of {tiny_data}/gsm8k/train.jsonl "
                           "(after data.val_size=0), got 4")
    prepare_inputs(prepare_config([*args, "eval.k_shot=3"], world_size=3))


# ------------------------------------------------------------------------------------------- under mpirun

@pytest.mark.mpi
@pytest.mark.slow
def test_empty_test_file_under_mpirun_is_one_line_and_exit_2(tiny_model, tiny_data, tmp_path):
    """Was a traceback after MPI start; now every rank stops in prepare_inputs, rank 0 prints one line."""
    (tiny_data / "sst2" / "test.jsonl").write_text("")
    p = mpirun(3, ["-m", "fedsoda_mpi.main", *args_for(tiny_model, tmp_path / "run")], timeout=300,
               env={"FEDSODA_DATA": str(tiny_data)})
    assert p.returncode == 2, (p.returncode, p.stderr[-1500:])
    lines = [line for line in p.stderr.splitlines() if "fedsoda-mpi" in line]
    assert lines == [f"fedsoda-mpi: data error: {tiny_data}/sst2/test.jsonl: is empty (no rows); {FIX}"], \
        p.stderr[-1500:]
    assert "Traceback" not in p.stderr and "Traceback" not in p.stdout
    assert not (tmp_path / "run").exists() and p.leftover_tmp == []


@pytest.mark.mpi
@pytest.mark.slow
def test_a_run_folder_in_use_is_one_line_and_exit_2(tiny_model, tiny_data, tmp_path):
    """A second job on a run folder that a live job holds (a resubmitted Slurm task, the same command twice)
    stops on every rank before the run, with one line naming the holder; the holder's files are untouched."""
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    code = ("import sys, time; from pathlib import Path; from fedsoda_mpi.runlog import lock_run_dir; "
            "lock_run_dir(Path(sys.argv[1])); print('locked', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        p = mpirun(3, ["-m", "fedsoda_mpi.main", *args_for(tiny_model, run_dir), "resume=auto"], timeout=300,
                   env={"FEDSODA_DATA": str(tiny_data)})
    finally:
        holder.kill()
        holder.wait()
    assert p.returncode == 2, (p.returncode, p.stderr[-1500:])
    lines = [line for line in p.stderr.splitlines() if "fedsoda-mpi" in line]
    assert len(lines) == 1 and lines[0].startswith(f"fedsoda-mpi: config error: {run_dir} is in use by another "
                                                   f"job (host "), p.stderr[-1500:]
    assert f"pid {holder.pid}" in lines[0] and "Traceback" not in p.stderr
    assert sorted(q.name for q in run_dir.iterdir()) == [".lock"] and p.leftover_tmp == []


def test_a_symlink_loop_as_output_dir_is_named(tiny_model, tmp_path):
    a, b = tmp_path / "loopA", tmp_path / "loopB"
    a.symlink_to(b)
    b.symlink_to(a)
    with pytest.raises(ConfigError) as e:
        prepare_config(args_for(tiny_model, a), world_size=3)
    assert one_line(e).startswith(f"output.dir: cannot use the run folder {a} (") and "ymlink loop" in one_line(e)


def test_output_name_is_a_plain_folder_name():
    for bad in ("../../escaped", "a/b", "..", "."):
        with pytest.raises(ConfigError) as e:
            load_config(None, [f"output.name={bad}"])
        assert one_line(e) == ("output.name: must be a plain folder name under output.root (no '/', not '.' or "
                               f"'..'; use output.dir for a path), got '{bad}'")
    assert load_config(None, ["output.name=my-run_1"]).output.name == "my-run_1"


def test_config_that_is_a_folder_says_so(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path, [])
    assert one_line(e) == f"--config {tmp_path}: is a folder; give a job YAML file (e.g. jobs/smollm2_sst2_iid.yaml)"


def test_omp_num_threads_is_checked_before_start_up(tiny_model, tmp_path, monkeypatch):
    """OMP_NUM_THREADS=abc was a ValueError traceback on the client ranks after the run had started."""
    for bad in ("abc", "0", "-2", "2.5"):
        with pytest.raises(ConfigError) as e:
            V.check_environment({"OMP_NUM_THREADS": bad})
        assert one_line(e) == (f"OMP_NUM_THREADS: must be a positive integer (the client ranks' torch threads), got "
                               f"'{bad}'; unset it or set e.g. OMP_NUM_THREADS=1")
    for good in ({}, {"OMP_NUM_THREADS": "1"}, {"OMP_NUM_THREADS": "4,2"}, {"OMP_NUM_THREADS": ""}):
        V.check_environment(good)
    monkeypatch.setenv("OMP_NUM_THREADS", "abc")
    with pytest.raises(ConfigError, match="^OMP_NUM_THREADS: must be a positive integer"):
        prepare_config(args_for(tiny_model, tmp_path / "run"), world_size=3)
