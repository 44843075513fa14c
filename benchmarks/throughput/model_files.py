"""Files a throughput run makes from the model's ``config.json`` alone (the runs use
``--load-format dummy``: random weights, so quality is not measured, only capacity and speed).

- ``write_tiny_model_config``: a config-only tiny Llama for the CPU preset (same shapes as
  ``tests/tiny_models.py``, a longer context).
- ``write_wordlevel_tokenizer``: a word-level tokenizer with exactly the model's vocabulary, token
  ``i`` spelled ``w<i>``. Every id decodes to non-empty text and ``decode -> encode`` gives the ids
  back, so SGLang's client sees a streamed text chunk for every token (its TTFT / ITL need text) and
  its generated-shared-prefix prompts (sent as text) re-tokenize to the intended lengths.
- ``write_resampled_profile``: a DepthKV profile bound to the model's identity whose sensitivity
  curves are the measured SmolLM2-135M curves (``benchmarks/results/smollm2_profile.json``, 30
  layers) resampled linearly over relative depth to the model's layer count. With dummy weights no
  profile can be measured; this one gives DepthKV a realistic non-uniform per-layer split.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Union

ROOT = Path(__file__).resolve().parents[2]
SMOLLM2_PROFILE = ROOT / "benchmarks" / "results" / "smollm2_profile.json"

TINY_LLAMA = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=512, hidden_size=128,
    intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
    max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu",
    rope_theta=10000.0, bos_token_id=1, eos_token_id=2, torch_dtype="float32",
)

DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "half": 2}


def read_model_config(model_dir: Union[str, Path]) -> dict:
    p = Path(model_dir) / "config.json"
    if not p.is_file():
        raise FileNotFoundError(f"--model: no config.json in {model_dir}")
    cfg = json.loads(p.read_text())
    for key in ("num_hidden_layers", "num_attention_heads", "hidden_size", "vocab_size", "intermediate_size"):
        if not isinstance(cfg.get(key), int) or cfg[key] < 1:
            raise ValueError(f"--model: {p} has no positive integer {key!r}")
    return cfg


def head_dim(cfg: dict) -> int:
    return int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])


def kv_heads(cfg: dict) -> int:
    return int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])


def dtype_bytes(cfg: dict, dtype: str = None) -> int:
    """Bytes per element of the weights and the KV cache: ``dtype`` (the server's ``--dtype``) if
    given, else the config's ``torch_dtype`` / ``dtype``."""
    name = dtype if dtype not in (None, "auto") else (cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16")
    name = str(name).replace("torch.", "")
    if name not in DTYPE_BYTES:
        raise ValueError(f"--dtype: unknown dtype {name!r}; one of {', '.join(sorted(DTYPE_BYTES))}")
    return DTYPE_BYTES[name]


def write_tiny_model_config(out_dir: Union[str, Path], **overrides) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = dict(TINY_LLAMA)
    cfg.update(overrides)
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    return out


def write_wordlevel_tokenizer(out_dir: Union[str, Path], vocab_size: int) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    if not isinstance(vocab_size, int) or vocab_size < 2:
        raise ValueError(f"tokenizer vocab_size must be an integer >= 2, got {vocab_size!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 20,
        "clean_up_tokenization_spaces": False}, indent=1))
    return out


def hf_config_view(cfg: dict) -> SimpleNamespace:
    """What ``ModelIdentity.from_hf_config`` and the plugin's capacity code read, from a dict."""
    return SimpleNamespace(**cfg)


def resample_rows(rows: list, num_layers: int) -> list:
    """Linear interpolation of per-layer rows over relative depth (layer l at l / (L - 1))."""
    src = len(rows)
    if src < 1 or num_layers < 1:
        raise ValueError("resample_rows: need at least one source row and one target layer")
    out = []
    for l in range(num_layers):
        x = 0.0 if num_layers == 1 else l * (src - 1) / (num_layers - 1)
        i = min(int(x), src - 1)
        j = min(i + 1, src - 1)
        w = x - i
        out.append([(1 - w) * a + w * b for a, b in zip(rows[i], rows[j])])
    return out


def write_resampled_profile(out_path: Union[str, Path], cfg: dict, source: Union[str, Path] = SMOLLM2_PROFILE) -> Path:
    from sglang_depthkv.core.profile import SensitivityProfile, load_profile, save_profile
    from sglang_depthkv.core.scorers import profile_scorer, scorer_record
    from sglang_depthkv.core.types import ModelIdentity

    src = load_profile(source)
    # the source's scorer as it measured (pool kernel, score name): DepthKV serves with it
    scorer = scorer_record(profile_scorer(src.scorer, src.calibration.get("pool_kernel")))
    identity = ModelIdentity.from_hf_config(hf_config_view(cfg), name="dummy-weights:" + str(cfg.get("model_type", "")))
    prof = SensitivityProfile(
        model=identity, scorer=src.scorer, keep_fractions=list(src.keep_fractions),
        sensitivity=resample_rows(src.sensitivity, identity.num_layers), metric=src.metric,
        calibration={**scorer, "resampled_from": str(Path(source).name), "source_model": src.model.name,
                     "method": "linear interpolation of the per-layer KL curves over relative depth",
                     "note": "throughput runs on dummy weights: capacity and speed only, quality not measured"},
    )
    return save_profile(prof, out_path)
