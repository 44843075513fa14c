"""Engine runs for the SGLang integration tests, executed in a subprocess (a dying SGLang child
SIGKILLs its parent's process tree). Usage: python engine_runs.py SPEC_JSON; prints one line
``RESULT {json}``. SPEC: {"runs": [{"name", "model", "engine_kwargs", "prompts", "max_new_tokens",
"expect_error"?}]}. For each run: greedy tokens of every prompt singly, as one batch, and again
(radix hit), plus max_total_num_tokens and (for the plugin) the pool / allocator / tree classes."""

import json
import os
import sys
import traceback


def _sigquit(*_a, **_k):
    print("scheduler died (custom_sigquit_handler)", file=sys.stderr, flush=True)


def run_one(run):
    import sglang

    kw = dict(device="cpu", attention_backend=None, skip_tokenizer_init=True, disable_cuda_graph=True,
              dtype="float32", max_total_tokens=2048, max_running_requests=8, mem_fraction_static=0.3,
              custom_sigquit_handler=_sigquit, log_level="error")
    kw.update(run.get("engine_kwargs", {}))
    if kw.get("attention_backend") is None:
        kw.pop("attention_backend")
    out = {"name": run["name"]}
    try:
        eng = sglang.Engine(model_path=run["model"], **kw)
    except Exception as e:  # noqa: BLE001 - reported to the test
        out["error_type"] = type(e).__name__
        out["error"] = str(e)
        return out
    try:
        sp = {"temperature": 0, "max_new_tokens": run["max_new_tokens"], "ignore_eos": True}
        prompts = run["prompts"]
        single = [eng.generate(input_ids=p, sampling_params=sp)["output_ids"] for p in prompts]
        batch = [r["output_ids"] for r in eng.generate(input_ids=prompts, sampling_params=sp)]
        again = eng.generate(input_ids=prompts[-1], sampling_params=sp)
        out.update(single=single, batch=batch, radix_hit=again["output_ids"],
                   cached_tokens=again["meta_info"].get("cached_tokens"))
        info = eng.get_server_info()
        out["max_total_num_tokens"] = info.get("max_total_num_tokens")
        if out["max_total_num_tokens"] is None:
            internal = info.get("internal_states") or [{}]
            out["max_total_num_tokens"] = internal[0].get("max_total_num_tokens")
    finally:
        eng.shutdown()
    return out


def main():
    spec = json.loads(sys.argv[1])
    results = []
    for run in spec["runs"]:
        try:
            results.append(run_one(run))
        except Exception as e:  # noqa: BLE001
            results.append({"name": run["name"], "error_type": type(e).__name__, "error": str(e),
                            "traceback": traceback.format_exc()})
    print("RESULT " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
