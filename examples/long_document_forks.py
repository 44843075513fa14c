"""A long document, several questions about it, one fork per question: a plain SGLang frontend
program (``sgl.function``, ``fork``, ``gen``). It runs unchanged against vanilla SGLang and against
a server with the DepthKV plugin:

    SMOLLM2_DIR=$(python -c "from sglang_depthkv.core.smollm2 import export_hf_dir; print(export_hf_dir())")
    source scripts/cpu-env.sh     # on a CPU-only machine
    python -m sglang.launch_server --model-path $SMOLLM2_DIR --port 30000 \\
        --device cpu --disable-cuda-graph --attention-backend torch_native --dtype float32 \\
        --max-total-tokens 16384 \\
        --kv-policy depthkv --kv-budget 0.3 --kv-profile benchmarks/results/smollm2_profile.json
    python examples/long_document_forks.py --url http://127.0.0.1:30000

A shared prefix longer than ``--chunked-prefill-size`` (CPU default 2048) is prefilled in chunks and
pruned whole at its final chunk, as one unchunked prefill would be.

The document (~2.1k tokens of Austen's *Persuasion* with three planted facts) goes into the
prompt once; ``s.fork(3)`` first sends the shared text (system turn + document) as one prefill, which
the server prunes once and keeps in its radix tree; each fork then asks its question and its
request reuses that cached, pruned prefix (SmolLM2's chat format is ``--chat-template chatml``, the
default here). For every fork the program prints the answer, the
planted value it should contain, and ``prompt_tokens`` / ``cached_tokens`` from the request's
``meta_info`` (cached = tokens served from the radix tree).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import sglang as sgl

# (planted sentence, question, start of the answer, expected value)
FACTS = (
    ("The pass key is 71432. Remember it. 71432 is the pass key.",
     "What is the pass key?", "The pass key is ", "71432"),
    ("The door code is 5830. Remember it. 5830 is the door code.",
     "What is the door code?", "The door code is ", "5830"),
    ("The room number is 214. Remember it. 214 is the room number.",
     "What is the room number?", "The room number is ", "214"),
)
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
INSTRUCTION = "Read the text and answer the question about it."
# Ends the shared prefix: a pruning policy that scores tokens by the attention of the prefix's last
# queries (SnapKV, DepthKV) decides before any question is known; this line points those queries at
# what the questions will ask about.
REMINDER = "Remember the pass key, the door code and the room number in the text above."


def build_document(chars: int = 8000, novel: str = "persuasion", first_paragraph: int = 40) -> str:
    """``chars`` characters of whole paragraphs of the novel, the facts planted as their own
    paragraphs at 1/4, 1/2 and 3/4 of the way through."""
    from sglang_depthkv.core.haystack import paragraphs

    paras, total = [], 0
    for p in paragraphs(novel)[first_paragraph:]:
        if total >= chars:
            break
        paras.append(p)
        total += len(p) + 2
    if len(paras) < len(FACTS) + 1:
        raise ValueError(f"--doc-chars {chars}: too short to plant {len(FACTS)} facts")
    for i, (fact, *_rest) in reversed(list(enumerate(FACTS))):
        paras.insert((i + 1) * len(paras) // (len(FACTS) + 1), fact)
    return "\n\n".join(paras)


@sgl.function
def long_document_qa(s, document, questions):
    s += sgl.system(SYSTEM)
    s += sgl.user_begin()
    s += INSTRUCTION + "\n\n" + document + "\n\n" + REMINDER
    # fork() sends the shared text as one prefill (cached in the radix tree) only if that text is
    # already materialised; the += above run on the state's worker thread, so wait for them first.
    s.sync()
    forks = s.fork(len(questions))
    for f, (question, answer_start) in zip(forks, questions):
        f += "\n\n" + question
        f += sgl.user_end()
        f += sgl.assistant_begin()
        f += answer_start + sgl.gen("answer", max_tokens=12, stop="\n")
    return [(f["answer"], f.get_meta_info("answer")) for f in forks]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:30000", help="the SGLang server")
    p.add_argument("--chat-template", default="chatml", help="SGLang frontend chat template (SmolLM2: chatml)")
    p.add_argument("--doc-chars", type=int, default=8000, help="document length in characters")
    p.add_argument("--json", type=Path, default=None, help="also write the answers and meta_info here")
    a = p.parse_args(argv)
    if a.doc_chars < 1000:
        p.error(f"--doc-chars must be >= 1000, got {a.doc_chars}")

    sgl.set_default_backend(sgl.RuntimeEndpoint(a.url, chat_template_name=a.chat_template))
    document = build_document(a.doc_chars)
    state = long_document_qa.run(document=document, questions=[(q, start) for _, q, start, _ in FACTS],
                                 temperature=0)
    results = []
    print(f"document: {len(document)} characters, {len(FACTS)} forked questions, server {a.url}")
    for i, ((_, question, start, expected), (answer, meta)) in enumerate(zip(FACTS, state.ret_value)):
        ok = expected in answer
        results.append({"question": question, "answer": start + answer, "expected": expected, "correct": ok,
                        "prompt_tokens": meta.get("prompt_tokens"), "cached_tokens": meta.get("cached_tokens"),
                        "completion_tokens": meta.get("completion_tokens")})
        print(f"fork {i}: {question}\n  -> {start + answer!r}  [{'correct' if ok else 'expected ' + expected}]"
              f"  prompt_tokens={meta.get('prompt_tokens')} cached_tokens={meta.get('cached_tokens')}")
    if a.json is not None:
        a.json.write_text(json.dumps({"url": a.url, "document_chars": len(document), "forks": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
