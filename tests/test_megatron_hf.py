"""HF <-> megatron-core conversion (raco_ds.megatron.hf) on CPU ranks (gloo).

For each layout (TP=1, TP=2, PP=2 on 2 ranks) and each tiny random model
(a Llama with GQA, tied embeddings, an odd vocabulary that TP=2 must pad, a
non-default RoPE theta; a Qwen2 with q/k/v biases and untied embeddings),
plus a bf16 Qwen2 and the packaged tiny Llama (with its tokenizer) at TP=2:

- the HF weights loaded into the Megatron GPTModel give the HF model's logits
  (``attn_implementation="eager"``; PP=2 runs stage 0, sends its hidden
  states, runs stage 1);
- export back to an HF folder is exact: every tensor bitwise equal to the
  original, the same names, and ``AutoModelForCausalLM.from_pretrained`` of it
  gives bitwise the original logits;
- ``launchers/eval.py`` accepts the packaged tiny model's export and scores it
  exactly like the original (margins and KL 0).

Every weight is randomised (norm weights too), so a swapped or mis-sliced
tensor shows. ``test_smollm2_*`` (slow) does the same for the packaged
SmolLM2-135M at TP=1, TP=3 and PP=3 (tied embeddings across stages) on 3
ranks: its 9 heads / 3 query groups rule out TP=2.

Run: ``pytest tests/test_megatron_hf.py`` (the slow SmolLM2 test: ``-m slow``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")

from multirank import run_ranks

# Measured (max |megatron - HF| / max |HF|, fp32): 0 (bitwise) at TP=1 and PP=2, 4.1e-7 / 5.2e-7 at TP=2
# (Qwen2 / Llama); a swapped gate/up or un-interleaved QKV gives 0.7 / 1.0-1.4. See docs/megatron.md.
# bf16: HF's own bf16 logits differ from its fp32 ones by 1.5e-2 / 1.8e-2 on these models; Megatron bf16
# vs HF bf16 measures the same (1.5e-2 / 1.7e-2).
LOGITS_RTOL = {"fp32": 1e-5, "bf16": 5e-2}
SEQ, BATCH = 12, 2
REPO = Path(__file__).resolve().parents[1]


def _tiny_hf_folder(kind: str, folder: Path) -> Path:
    """A tiny random HF model with every weight (norms and biases too) drawn at a visible scale."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)
    if kind.startswith("llama"):
        config = LlamaConfig(vocab_size=99, tie_word_embeddings=True,
                             rope_parameters={"rope_type": "default", "rope_theta": 50000.0}, **common)
    else:
        config = Qwen2Config(vocab_size=96, tie_word_embeddings=False,
                             rope_parameters={"rope_type": "default", "rope_theta": 1e6}, **common)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(1 + 0.1 * torch.randn_like(param) if "norm" in name else 0.1 * torch.randn_like(param))
    if kind.endswith("-bf16"):
        model = model.to(torch.bfloat16)
    model.save_pretrained(folder)
    return folder


def _input_ids(vocab: int):
    import torch

    return torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))


def _dtype(folder: str | Path) -> str:
    """"bf16" for a folder saved in bf16, else "fp32" (the names config_from_hf takes)."""
    from transformers import AutoConfig

    return "bf16" if "bfloat16" in str(AutoConfig.from_pretrained(folder).dtype) else "fp32"


def _hf_logits(folder: Path, ids):
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if _dtype(folder) == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="eager")
    with torch.no_grad():
        return model(ids).logits


def _megatron_logits(model, ids, vocab: int):
    """Full logits on the last stage (TP slices gathered, padding dropped); None on other stages."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    positions = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        if not ps.is_pipeline_first_stage():
            hidden = torch.empty(ids.shape[1], ids.shape[0], model.config.hidden_size, dtype=model.config.params_dtype)
            dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(hidden)
        out = model(ids, positions, None)
        if not ps.is_pipeline_last_stage():
            dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
            return None
    pieces = [torch.empty_like(out) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(pieces, out, group=ps.get_tensor_model_parallel_group())
    return torch.cat(pieces, dim=-1)[..., :vocab]


def _round_trip_mismatches(original: Path, exported: Path) -> list[str]:
    """Names whose exported tensor is not bitwise the original (or exists on one side only)."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig

    def tensors(folder: Path) -> dict:
        out = {}
        for file in folder.glob("*.safetensors"):
            out.update(load_file(file))
        if AutoConfig.from_pretrained(folder).tie_word_embeddings:
            out.setdefault("model.embed_tokens.weight", out.get("lm_head.weight"))
            out.pop("lm_head.weight", None)  # one name of the tied pair
        return out

    a, b = tensors(original), tensors(exported)
    return sorted(n for n in a.keys() | b.keys() if n not in a or n not in b or not torch.equal(a[n], b[n]))


def _body(rank: int, world_size: int, cases: list, out_root: str) -> dict:
    """For each (tp, pp, kind, HF folder): load, compare logits, export, compare the export with the original."""
    import megatron_shim
    import torch
    from megatron.core import parallel_state as ps
    from transformers import AutoConfig

    from raco_ds.megatron.hf import config_from_hf, export_megatron_to_hf, load_hf_into_megatron

    megatron_shim.install()
    results = {}
    for tp, pp, kind, folder in cases:
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
        vocab = AutoConfig.from_pretrained(folder).vocab_size
        ids = _input_ids(vocab)
        spec = config_from_hf(folder, tensor_parallel=tp, pipeline_parallel=pp, dtype=_dtype(folder))
        model = spec.build_model()
        load_hf_into_megatron([model], folder)
        logits = _megatron_logits(model, ids, vocab)
        key = f"{kind}/tp{tp}pp{pp}"
        if logits is not None:
            reference = _hf_logits(Path(folder), ids)
            error = (logits.float() - reference.float()).abs().max() / reference.float().abs().max()
            results[key + "/logits_rel"] = float(error)
        out = Path(out_root, key.replace("/", "-"))
        tokenizer = folder if Path(folder, "tokenizer.json").is_file() else None
        written = export_megatron_to_hf([model], out, spec.hf_config, tokenizer=tokenizer)
        if written is not None:
            results[key + "/mismatched"] = _round_trip_mismatches(Path(folder), written)
            results[key + "/reload_equal"] = torch.equal(_hf_logits(written, ids), _hf_logits(Path(folder), ids))
        ps.destroy_model_parallel()
    return results


def _eval_launcher():
    import importlib.util

    spec = importlib.util.spec_from_file_location("eval_launcher", REPO / "launchers" / "eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check(merged: dict, key: str) -> None:
    tolerance = LOGITS_RTOL["bf16" if key.split("/")[0].endswith("-bf16") else "fp32"]
    assert merged[key + "/logits_rel"] < tolerance, (key, merged[key + "/logits_rel"])
    assert merged[key + "/mismatched"] == [], key
    assert merged[key + "/reload_equal"], key


def test_tiny_models_convert_exactly_at_tp1_tp2_pp2(tmp_path: Path) -> None:
    from raco_ds.models import resolve_model_path

    folders = {kind: str(_tiny_hf_folder(kind, tmp_path / kind)) for kind in ("llama", "qwen2")}
    layouts = [(1, 1), (2, 1), (1, 2)]
    cases = [(tp, pp, kind, folder) for tp, pp in layouts for kind, folder in folders.items()]
    # A bf16 model once (bf16 parameters, a bf16 export), and the packaged tiny model with its tokenizer
    # once: its export must pass launchers/eval.py.
    cases.append((2, 1, "qwen2-bf16", str(_tiny_hf_folder("qwen2-bf16", tmp_path / "qwen2-bf16"))))
    cases.append((2, 1, "tiny", resolve_model_path("tiny")))
    per_rank = run_ranks(_body, 2, cases, str(tmp_path / "exports"))
    merged = {k: v for r in per_rank for k, v in r.items()}
    for tp, pp, kind, _ in cases:
        _check(merged, f"{kind}/tp{tp}pp{pp}")

    report = tmp_path / "eval.json"
    exported = tmp_path / "exports" / "tiny-tp2pp1"
    code = _eval_launcher().main(["--model", str(exported), "--preset", "tiny", "--data.num_eval_pairs", "8",
                                  "--output", str(report)])
    assert code == 0
    metrics = json.loads(report.read_text())["metrics"]
    # The preset's reference is the original tiny model: an exact export scores exactly like it.
    assert metrics["margin"] == [0.0, 0.0] and metrics["kl_proxy"] == [0.0, 0.0]


@pytest.mark.slow
def test_smollm2_converts_exactly_at_tp1_tp3_pp3(tmp_path: Path) -> None:
    from raco_ds.smollm2 import ensure_smollm2

    try:
        folder = str(ensure_smollm2())
    except FileNotFoundError as missing:
        pytest.skip(str(missing))
    cases = [(1, 1, "smollm2", folder), (3, 1, "smollm2", folder), (1, 3, "smollm2", folder)]
    per_rank = run_ranks(_body, 3, cases, str(tmp_path))
    merged = {k: v for r in per_rank for k, v in r.items()}
    for tp, pp, kind, _ in cases:
        _check(merged, f"{kind}/tp{tp}pp{pp}")


def test_rejects_a_folder_without_safetensors(tmp_path: Path) -> None:
    from transformers import LlamaConfig

    from raco_ds.megatron.hf import load_hf_into_megatron

    LlamaConfig(num_hidden_layers=1).save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="safe_serialization=True"):
        load_hf_into_megatron([], tmp_path)


def test_rejects_weights_that_do_not_match_the_config(tmp_path: Path) -> None:
    from transformers import AutoConfig

    from raco_ds.megatron.hf import load_hf_into_megatron

    folder = _tiny_hf_folder("llama", tmp_path)
    config = AutoConfig.from_pretrained(folder)
    config.num_hidden_layers = 3
    config.save_pretrained(folder)
    with pytest.raises(ValueError, match=r"missing \['model.layers.2"):
        load_hf_into_megatron([], folder)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"mlp_bias": True}, "mlp_bias=True"),
        ({"attention_bias": True}, "attention_bias=True"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope scaling"),
        ({"num_key_value_heads": 3, "num_attention_heads": 9, "hidden_size": 72}, r"use a TP in \[1, 3\]"),
    ],
)
def test_rejects_what_the_llama_block_would_compute_differently(change: dict, match: str) -> None:
    from transformers import LlamaConfig

    from raco_ds.megatron.hf import config_from_hf

    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=99)
    for field, value in change.items():
        setattr(config, field, value)
    with pytest.raises(ValueError, match=match):
        config_from_hf(config, tensor_parallel=2)


def test_rejects_overriding_what_the_weights_decide() -> None:
    from transformers import LlamaConfig

    from raco_ds.megatron.hf import config_from_hf

    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=99)
    with pytest.raises(ValueError, match=r"\['num_layers'\] follow from the HF config"):
        config_from_hf(config, num_layers=1)
    assert config_from_hf(config, hidden_dropout=0.1).transformer_config.hidden_dropout == 0.1


def test_load_rejects_an_architecture_the_llama_block_does_not_compute(tmp_path: Path) -> None:
    from transformers import AutoConfig

    from raco_ds.megatron.hf import load_hf_into_megatron

    folder = _tiny_hf_folder("llama", tmp_path)
    config = AutoConfig.from_pretrained(folder)
    config.hidden_act = "gelu"
    config.save_pretrained(folder)
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        load_hf_into_megatron([], folder)
