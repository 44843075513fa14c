"""Runs in the kvpress venv (transformers < 5.3), for ``test_kvpress_shared_prefill.py``: every
kvpress press at two budgets on a tiny seeded Llama, once through the peers script's shared prefill
and once through kvpress's own pipeline (one prefill under each press). Prints one JSON document.

    python tests/core/kvpress_shared_prefill_run.py TOKENIZER_DIR WORK_DIR
"""

import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.accuracy.kvpress_peers import PRESSES, make_press, press_greedy, shared_press_runs  # noqa: E402
from tests.tiny_models import make_tiny_model  # noqa: E402

BUDGETS = (0.2, 0.5)
N, NEW = 96, 6


def main(tok_dir: Path, work: Path) -> dict:
    from transformers import AutoModelForCausalLM

    work.mkdir(parents=True, exist_ok=True)
    # KVzipPress tokenizes its reconstruction prompt with the model's own tokenizer: SmolLM2's, so the
    # tiny model takes SmolLM2's vocabulary size
    make_tiny_model("llama", seed=3, vocab_size=49152, init_std=0.12).save_pretrained(work, safe_serialization=True)
    for f in tok_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, work / f.name)
    model = AutoModelForCausalLM.from_pretrained(work, dtype=torch.float32, attn_implementation="sdpa").eval()
    ids = torch.randint(10, 49000, (N,), generator=torch.Generator().manual_seed(0))
    never = lambda tokens: False  # noqa: E731  (decode all NEW tokens)
    runs = [("full", 1.0, None)] + [(p, b, make_press(p, b)) for p in PRESSES for b in BUDGETS]
    shared = shared_press_runs(model, ids, runs, NEW, never)
    masks_left = [getattr(layer.self_attn, "masked_key_indices", None) is not None for layer in model.model.layers]
    per_press = [press_greedy(model, ids, None if press is None else make_press(p, b), NEW, never)
                 for p, b, press in runs]
    return {"runs": [[p, b] for p, b, _ in runs], "shared": shared, "per_press": per_press,
            "masks_left_after_shared": masks_left}


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), Path(sys.argv[2]))))
