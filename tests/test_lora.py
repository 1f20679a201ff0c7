"""LoRA through peft (raco_ds.lora), single process: config, which parameters train, one-pass capture on
peft's layers, the adapters-disabled reference, and the adapter/merged exports."""

from __future__ import annotations

import pytest
import torch
from test_onepass import _labels, batch, max_rel_err, onepass_grads, reference_grads, tiny_model

from raco_ds.onepass import UnsupportedModuleError
from raco_ds.trainer.config import ConfigError, LoraAdapterConfig, load_config, parse_args, save_config

peft = pytest.importorskip("peft")


def _lora(model: torch.nn.Module, blocks: int = -1, **options) -> torch.nn.Module:
    """``model`` with adapters via the trainer's path, LoRA B made nonzero (a trained adapter) by seed."""
    from raco_ds.lora import add_lora
    from raco_ds.trainer.model import last_blocks

    wrapped = add_lora(model, LoraAdapterConfig(r=4, **options), last_blocks(model, blocks), base_name="tiny")
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return wrapped


def test_options_parse_round_trip_and_show_in_help(tmp_path):
    from raco_ds.trainer.config import help_text

    cfg = parse_args(["--preset", "tiny", "--model.lora.r", "8", "--model.lora.alpha", "32", "--model.lora.dropout",
                      "0.05", "--model.lora.target_modules", "q_proj,v_proj", "--model.lora.use_rslora"])  # fmt: skip
    assert cfg.model.lora == LoraAdapterConfig(r=8, alpha=32.0, dropout=0.05, target_modules=["q_proj", "v_proj"],
                                               use_rslora=True)  # fmt: skip
    assert load_config(save_config(cfg, tmp_path / "c.yaml")) == cfg
    assert "--model.lora.target_modules" in help_text() and "--model.lora.use_dora" in help_text()


@pytest.mark.parametrize(("argv", "message"), [
    (["--model.lora.use_dora"], "model.lora.use_dora is set but LoRA is off"),
    (["--model.lora.r", "-1"], "model.lora.r must be >= 0"),
    (["--model.lora.r", "4", "--model.lora.dropout", "1"], r"model.lora.dropout must be in \[0, 1\)"),
    (["--model.lora.r", "4", "--model.lora.alpha", "0"], "model.lora.alpha must be a positive number"),
    (["--model.lora.r", "4", "--model.train_embeddings", "true"], "train_embeddings does not apply with LoRA"),
    (["--model.lora.r", "4", "--model.trainable_last_blocks", "0"], "puts adapters on no block"),
])  # fmt: skip
def test_rejects_bad_lora_options(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(["--preset", "tiny", *argv])


def test_only_adapters_train_and_last_blocks_choose_where():
    from raco_ds.trainer.model import freeze_bottom

    model = _lora(tiny_model("llama"), blocks=1)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert all(".layers.1." in n for n in trainable)  # the last of 2 blocks only
    assert {n.split(".")[-4] for n in trainable} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                      "down_proj"}  # every block linear layer, never lm_head
    cfg = parse_args(["--preset", "tiny", "--model.lora.r", "4", "--model.trainable_last_blocks", "1"])
    trained, total = freeze_bottom(model, cfg)  # leaves peft's choice alone
    assert trained == sum(p.numel() for p in model.parameters() if p.requires_grad) and trained < total


def test_unknown_target_module_names_the_available_ones():
    with pytest.raises(ConfigError, match=r"\['nope'\] name no linear layer.*'q_proj'"):
        _lora(tiny_model("llama"), target_modules=["q_proj", "nope"])


@pytest.mark.parametrize("shape", ["shared", "objective_rows"])
@pytest.mark.parametrize("options", [{"dropout": 0.2}, {"use_rslora": True, "target_modules": ["q_proj", "down_proj"]}])
def test_onepass_is_exact_on_lora_layers(shape, options):
    """The frozen base layer contributes nothing; A and B (behind dropout) equal K backwards."""
    model = _lora(tiny_model("llama"), **options)
    data, labels = batch(4), _labels(shape, 2, 4)
    torch.manual_seed(3)  # the same dropout masks in both
    ref = reference_grads(model, data, labels, shape)
    torch.manual_seed(3)
    assert max_rel_err(onepass_grads(model, data, labels, shape), ref) <= 1e-5


def test_onepass_refuses_dora_magnitude_by_name():
    model = _lora(tiny_model("llama"), use_dora=True)
    with pytest.raises(UnsupportedModuleError, match=r"lora_magnitude_vector\.default.*DoraLinearLayer"):
        onepass_grads(model, batch(2), _labels("shared", 2, 2), "shared")


def test_reference_is_the_base_model():
    """Initial adapters (B = 0) compute the base model exactly; adapters_disabled gives the base after training."""
    from raco_ds.lora import adapters_disabled, add_lora
    from raco_ds.trainer.model import last_blocks

    ids = batch(3)["input_ids"]
    base = tiny_model("llama").eval()
    with torch.no_grad():
        expected = base(input_ids=ids).logits
        fresh = tiny_model("llama")
        fresh = add_lora(fresh, LoraAdapterConfig(r=4), last_blocks(fresh, -1), "tiny").eval()
        assert torch.equal(fresh(input_ids=ids).logits, expected)
        trained = _lora(tiny_model("llama")).eval()
        assert not torch.allclose(trained(input_ids=ids).logits, expected)
        with adapters_disabled(trained):
            assert torch.equal(trained(input_ids=ids).logits, expected)
    with torch.no_grad(), adapters_disabled(base):  # no adapters: a no-op
        assert torch.equal(base(input_ids=ids).logits, expected)


def test_export_writes_a_peft_adapter_and_the_merged_model(tmp_path):
    """The adapter folder loads with PeftModel.from_pretrained, the merged one with transformers, and
    raco_ds.models.load_model takes either: all compute the trained model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from raco_ds.models import load_model, load_tokenizer
    from raco_ds.trainer.export import export_lora

    trained = _lora(load_model("tiny")).eval()
    adapter, merged = export_lora(trained, load_tokenizer("tiny"), tmp_path / "adapter", tmp_path / "merged")
    assert (adapter / "adapter_model.safetensors").is_file() and (merged / "tokenizer.json").is_file()
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
        reloaded = PeftModel.from_pretrained(load_model("tiny"), str(adapter)).eval()
        assert torch.equal(reloaded(input_ids=ids).logits, expected)
        for model in (AutoModelForCausalLM.from_pretrained(merged), load_model(str(adapter))):
            torch.testing.assert_close(model.eval()(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
