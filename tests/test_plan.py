"""The preflight memory plan (raco_ds.planning, launchers/plan.py) against DeepSpeed's own estimators."""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from raco_ds.planning import GIB, PRESETS, JobShape, ModelShape, activation_bytes_per_layer, plan_memory

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("plan_cli", ROOT / "launchers" / "plan.py")
plan_cli = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
sys.modules["plan_cli"] = plan_cli  # dataclasses look their module up while the file runs
_spec.loader.exec_module(plan_cli)  # type: ignore[union-attr]

LAYOUTS = [(1, 8), (2, 8), (16, 8), (64, 8), (128, 8), (3, 4)]


def test_preset_parameter_counts_match_the_published_models() -> None:
    assert PRESETS["llama3-70b"].num_params == 70_553_706_496
    assert PRESETS["llama3-8b"].num_params == 8_030_261_248
    assert PRESETS["llama3-70b"].largest_module_params == 128256 * 8192  # embedding / LM head


@pytest.mark.parametrize("tied,bias,kv", [(False, False, 2), (True, False, 4), (False, True, 1)])
def test_shape_counts_match_a_real_model_and_deepspeed(tmp_path: Path, tied: bool, bias: bool, kv: int) -> None:
    """Parameter count and largest module from config.json equal DeepSpeed's model_to_params on the model."""
    transformers = pytest.importorskip("transformers")
    from deepspeed.runtime.zero.stage3 import model_to_params

    config = transformers.LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=kv,
        intermediate_size=96, vocab_size=300, tie_word_embeddings=tied, attention_bias=bias, mlp_bias=bias,
    )
    config.save_pretrained(tmp_path)
    shape = ModelShape.from_hf_config(tmp_path)
    total, largest = model_to_params(transformers.LlamaForCausalLM(config))
    assert shape.num_params == total
    assert shape.largest_module_params == largest


@pytest.mark.parametrize("nodes,gpus", LAYOUTS)
@pytest.mark.parametrize("offload", ["none", "optimizer", "param"])
@pytest.mark.parametrize("preset", ["llama3-70b", "llama3-8b"])
def test_zero3_model_states_agree_with_deepspeed(preset: str, offload: str, nodes: int, gpus: int) -> None:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    model = PRESETS[preset]
    job = JobShape(nodes=nodes, gpus_per_node=gpus, zero_stage=3, offload_optimizer=offload != "none",
                   offload_param=offload == "param")
    plan = plan_memory(model, job)
    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
        model.num_params, model.largest_module_params, num_gpus_per_node=gpus, num_nodes=nodes,
        cpu_offload=offload != "none", cpu_offload_params=offload == "param", zero_init=True,
    )
    assert abs(plan.deepspeed_model_states - gpu) <= 16  # integer division per term vs once
    if offload != "none":
        assert abs(plan.host_terms["offloaded model states x1.5"] - cpu) <= 16
    else:
        assert abs(plan.host_terms["load peak (zero.Init) x1.5"] - cpu) <= 16


@pytest.mark.parametrize("nodes,gpus", LAYOUTS)
@pytest.mark.parametrize("offload", [False, True])
def test_zero2_model_states_agree_with_deepspeed(offload: bool, nodes: int, gpus: int) -> None:
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    model = PRESETS["llama3-8b"]
    plan = plan_memory(model, JobShape(nodes=nodes, gpus_per_node=gpus, zero_stage=2, offload_optimizer=offload))
    _, gpu = estimate_zero2_model_states_mem_needs(model.num_params, gpus, nodes, cpu_offload=offload)
    assert abs(plan.deepspeed_model_states - gpu) <= 16


def test_raco_shards_are_k_partitions_in_the_accumulation_dtype() -> None:
    model = PRESETS["llama3-70b"]
    for k, dtype, size in [(2, "fp32", 4), (4, "fp32", 4), (3, "bf16", 2)]:
        job = JobShape(nodes=16, num_objectives=k, grad_accum_dtype=dtype)
        assert plan_memory(model, job).gpu_terms[f"RACO shards (K={k})"] == k * size * model.num_params // 128
    # Offloaded optimizer: the engine's partition and so the shards live on the host.
    offloaded = plan_memory(model, JobShape(nodes=2, offload_optimizer=True))
    assert offloaded.gpu_terms["RACO shards (K=2)"] == 0
    assert offloaded.host_terms["RACO shards (K=2)"] == 2 * 4 * model.num_params // 16 * 8


def test_activation_formula_by_hand() -> None:
    tiny = ModelShape(name="t", hidden_size=8, num_layers=3, num_heads=2, num_kv_heads=1,
                      intermediate_size=16, vocab_size=10)
    tokens = 2 * 5
    per_token = 18 * 8 + 6 * 4 + 8 * 16  # kv width = 1 head x 4
    assert activation_bytes_per_layer(tiny, 2, 5, flash_attention=True) == tokens * per_token + 4 * 2 * tokens
    assert activation_bytes_per_layer(tiny, 2, 5, flash_attention=False) == tokens * per_token + 6 * 2 * 5 * tokens
    job = JobShape(micro_batch=2, seq_len=5, activation_checkpointing=True)
    full = plan_memory(tiny, replace(job, activation_checkpointing=False)).gpu_terms["activations"]
    ckpt = plan_memory(tiny, job).gpu_terms["activations"]
    assert full == 3 * activation_bytes_per_layer(tiny, 2, 5) + 6 * tokens * 8
    assert ckpt < full
    assert ckpt == 3 * 2 * tokens * 8 + activation_bytes_per_layer(tiny, 2, 5) + 6 * tokens * 8


def test_more_nodes_never_need_more_memory() -> None:
    model = PRESETS["llama3-70b"]
    totals = [plan_memory(model, JobShape(nodes=n)).gpu_total for n in (1, 2, 4, 8, 16, 64, 128)]
    assert totals == sorted(totals, reverse=True)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"zero_stage": 0}, "zero_stage"),
        ({"offload_param": True}, "offload_param"),
        ({"micro_batch": 0}, "micro_batch"),
        ({"grad_accum_dtype": "fp16"}, "grad_accum_dtype"),
        ({"fragmentation": 1.5}, "fragmentation"),
        ({"reference": "none"}, "reference"),
    ],
)
def test_rejects_bad_job_fields(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=f"JobShape.{field}"):
        JobShape(**kwargs)  # type: ignore[arg-type]


def test_rejects_a_config_that_is_not_llama_shaped(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ValueError, match="num_hidden_layers"):
        ModelShape.from_hf_config(tmp_path / "config.json")


# --- the command line ------------------------------------------------------


def test_cli_refuses_70b_on_one_node_and_says_what_to_change(capsys: pytest.CaptureFixture[str]) -> None:
    rc = plan_cli.main(["--model", "llama3-70b", "--nodes", "1", "--ds-config", "ds_configs/zero3_70b.json",
                        "--quiet"])
    err = capsys.readouterr().err
    assert rc == plan_cli.EXIT_DOES_NOT_FIT
    assert "DOES NOT FIT" in err and "--gpu-mem-gib" in err
    assert "more nodes: --nodes" in err and "--offload optimizer" in err


def test_cli_suggests_a_smaller_micro_batch_and_checkpointing(capsys: pytest.CaptureFixture[str]) -> None:
    rc = plan_cli.main(["--model", "llama3-8b", "--nodes", "1", "--micro-batch", "2", "--no-checkpointing",
                        "--quiet"])
    err = capsys.readouterr().err
    assert rc == plan_cli.EXIT_DOES_NOT_FIT
    assert "--micro-batch" in err and "activation checkpointing" in err


def test_cli_host_memory_check_refuses_offload_that_the_host_cannot_hold(capsys: pytest.CaptureFixture[str]) -> None:
    rc = plan_cli.main(["--model", "llama3-70b", "--nodes", "1", "--offload", "optimizer", "--host-mem-gib", "1000",
                        "--quiet"])
    assert rc == plan_cli.EXIT_DOES_NOT_FIT
    assert "host memory" in capsys.readouterr().err


def test_cli_fits_70b_on_16_nodes_and_writes_the_planned_config(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ds.json"
    rc = plan_cli.main(["--model", "llama3-70b", "--nodes", "16", "--ds-config", "ds_configs/zero3_70b.json",
                        "--json", str(tmp_path / "plan.json"), "--write-ds-config", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert "FITS" in capsys.readouterr().out
    written = json.loads(out.read_text())
    assert written["zero_optimization"]["stage"] == 3 and written["bf16"]["enabled"] is True
    summary = json.loads((tmp_path / "plan.json").read_text())
    assert summary["fits"] and summary["job"]["world_size"] == 128


def test_cli_offload_param_writes_both_offloads(tmp_path: Path) -> None:
    out = tmp_path / "ds.json"
    assert plan_cli.main(["--nodes", "2", "--offload", "param", "--ds-config", "ds_configs/zero3_70b.json",
                          "--write-ds-config", str(out), "--quiet"]) == 0
    zero = json.loads(out.read_text())["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"


def test_cli_bad_model_exits_2_naming_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        plan_cli.main(["--model", "no/such/model"])
    assert exit_info.value.code == 2
    assert "--model 'no/such/model'" in capsys.readouterr().err


def test_cli_reads_stage_offload_and_dtype_from_the_ds_config(tmp_path: Path) -> None:
    config = json.loads((ROOT / "ds_configs/zero3_70b.json").read_text())
    config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    config["data_types"]["grad_accum_dtype"] = "bf16"
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config))
    args = plan_cli.build_parser().parse_args(["--ds-config", str(path)])
    job = plan_cli.job_from_args(args, config)
    assert job.zero_stage == 3 and job.offload_optimizer and not job.offload_param
    assert job.grad_accum_dtype == "bf16"


@pytest.mark.parametrize("name", ["zero3_70b.json", "zero3_8b.json"])
def test_shipped_70b_and_8b_configs_are_valid_deepspeed(name: str) -> None:
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    config = json.loads((ROOT / "ds_configs" / name).read_text())
    zero = DeepSpeedZeroConfig(**config["zero_optimization"])
    assert zero.stage == 3 and zero.overlap_comm
    assert config["bf16"]["enabled"] is True and config["data_types"]["grad_accum_dtype"] == "fp32"
    assert config["optimizer"]["params"]["torch_adam"] is True  # FusedAdam's JIT fails on H200 (HOOKS.md)


def test_plan_reports_gib_and_fits_flag() -> None:
    plan = plan_memory(PRESETS["llama3-70b"], JobShape(nodes=16))
    assert plan.fits and plan.gpu_total < 79.6 * GIB
    assert "RACO shards (K=2)" in plan.render()


# --- benchmarks/project.py (the 70B projection) uses the same memory model -----------------

_pspec = importlib.util.spec_from_file_location("project_bench", ROOT / "benchmarks" / "project.py")
project_bench = importlib.util.module_from_spec(_pspec)  # type: ignore[arg-type]
sys.modules["project_bench"] = project_bench
_pspec.loader.exec_module(project_bench)  # type: ignore[union-attr]


def _projection(**work: object) -> dict[str, object]:
    workload = project_bench.Workload(model=PRESETS["llama3-70b"], **work)
    return project_bench.project([8, 64, 1024], workload, project_bench.HARDWARE["h100"])


def test_projection_memory_agrees_with_deepspeed() -> None:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    model = PRESETS["llama3-70b"]
    for point in _projection()["points"]:  # type: ignore[union-attr]
        offload = point["offload"]
        _, gpu, _ = estimate_zero3_model_states_mem_needs(
            model.num_params, model.largest_module_params, num_gpus_per_node=8, num_nodes=point["nodes"],
            cpu_offload=offload != "none", cpu_offload_params=offload == "param", zero_init=True)
        assert abs(point["deepspeed_model_states_gib"] * GIB - gpu) <= 16
        assert point["k_shards_gib"] == pytest.approx(2 * 4 * model.num_params / point["gpus"] / GIB, rel=1e-9)
        assert point["fits"]


def test_projection_ratios_follow_the_pass_counts() -> None:
    result = _projection(num_objectives=3, pairs_per_objective=1, micro_rows=2)
    for point in result["points"]:  # type: ignore[union-attr]
        per_objective, shared = point["shapes"]["per_objective_pairs"], point["shapes"]["shared_pairs"]
        # micro-batch <= one objective's rows: the baseline needs as many passes as RACO's K passes
        assert per_objective["raco_k_passes"]["passes"] == per_objective["linear"]["passes"] == 3
        assert 1.0 <= per_objective["raco_k_passes"]["ratio_vs_linear"] < 1.02
        # shared pairs: K passes over the same rows cost about K; one pass costs about 1 (+ K x reduce-scatter)
        assert shared["raco_k_passes"]["ratio_vs_linear"] == pytest.approx(3, rel=0.02)
        assert 1.0 <= shared["raco_one_pass"]["ratio_vs_linear"] < shared["raco_k_passes"]["ratio_vs_linear"]
        assert point["gram_allreduce_bytes"] == 3 * 3 * 8


def test_collective_model() -> None:
    hw = project_bench.HARDWARE["h100"]
    one_node = project_bench.collective_seconds(1e9, 1, hw)
    assert one_node == pytest.approx(7 / 8 * 1e9 / (450e9 * 0.8) + 7 * 3e-6)
    assert project_bench.collective_seconds(1e9, 16, hw) > one_node  # the NIC phase adds time


def test_projection_cli_writes_json_with_assumptions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "p.json"
    assert project_bench.main(["--gpus", "64,128", "--json", str(out)]) == 0
    assert "assumptions:" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert [p["gpus"] for p in data["points"]] == [64, 128] and len(data["assumptions"]) >= 8


def test_lora_counts_match_peft_on_a_real_model() -> None:
    """ModelShape.lora_params equals peft's own trainable count for LoRA on every linear layer of the blocks."""
    import torch
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    config = tf.LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                            num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    torch.manual_seed(0)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(tf.LlamaForCausalLM(config), LoraConfig(r=4, target_modules=targets))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    shape = ModelShape(name="tiny", hidden_size=48, num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=80,
                       vocab_size=97)  # fmt: skip
    assert shape.lora_params(4) == trainable


def test_lora_plan_scales_trainable_states_and_drops_the_reference_copy() -> None:
    model = PRESETS["llama3-70b"]
    full = plan_memory(model, JobShape(nodes=16, num_objectives=4))
    lora = plan_memory(model, JobShape(nodes=16, num_objectives=4, lora_rank=16))
    ratio = model.lora_params(16) / model.num_params
    for term in ("RACO shards (K=4)", "fp32 master (partition)", "Adam m, v (partition)", "gradient partition"):
        assert lora.gpu_terms[term] == pytest.approx(full.gpu_terms[term] * ratio, rel=1e-3), term
    assert "reference model (bf16)" in full.gpu_terms and "reference model (bf16)" not in lora.gpu_terms
    assert lora.gpu_terms["bf16 params (partition)"] > full.gpu_terms["bf16 params (partition)"]  # + adapters
    assert not lora.deepspeed_terms  # DeepSpeed's estimators assume every parameter trains


def test_cli_lora_fits_70b_on_one_node(capsys: pytest.CaptureFixture[str]) -> None:
    assert plan_cli.main(["--model", "llama3-70b", "--nodes", "1", "--quiet"]) != 0
    capsys.readouterr()
    assert plan_cli.main(["--model", "llama3-70b", "--nodes", "1", "--lora-r", "16", "--quiet"]) == 0
    assert "fits" in capsys.readouterr().out
