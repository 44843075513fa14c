"""Engine runs for the pruning end-to-end tests, executed in a subprocess (a dying SGLang child
SIGKILLs its parent's process tree). Usage: python e2e_runs.py SPEC_JSON; prints one line
``RESULT {json}``. SPEC: {"runs": [{"name", "model", "engine_kwargs", "batches": [[{"rid", "ids"}...]...],
"max_new_tokens", "env"?}]} (``env``: variables set for that run only, e.g. SGLang's CPU thread binding of
tensor-parallel ranks). Each batch is sent as one ``generate`` call (requests of one batch are
scheduled together); the per-layer keep sets are read back from ``SGLANG_DEPTHKV_DUMP_KEEP``. With
``SGLANG_DEPTHKV_INVARIANT_LOG`` set, the engine is shut down only after every scheduler process
(``tp_size · dp_size``) has logged an idle check: a rank that took its first requests on its first
loop turn reaches the idle check only after its last batch, which a prompt shutdown would cut off."""

import json
import os
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "sglang"))
from engine_runs import _sigquit  # noqa: E402  (the Engine test runner's SIGQUIT handling)

from sglang_depthkv.sglang.invariant_log import ENV as INVARIANT_LOG_ENV, read_log  # noqa: E402
from sglang_depthkv.sglang.pruning import DUMP_ENV  # noqa: E402

IDLE_WAIT_S = 120


def run_one(run, tmp):
    dump = os.path.join(tmp, run["name"] + ".keep.jsonl")
    os.environ[DUMP_ENV] = dump  # inherited by the spawned scheduler
    saved = {k: os.environ.get(k) for k in run.get("env", {})}
    os.environ.update(run.get("env", {}))
    try:
        return _run_engine(run, dump)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _run_engine(run, dump):
    import sglang

    kw = dict(device="cpu", skip_tokenizer_init=True, disable_cuda_graph=True, dtype="float32",
              max_total_tokens=4096, max_running_requests=8, mem_fraction_static=0.3,
              custom_sigquit_handler=_sigquit, log_level="error")
    kw.update(run.get("engine_kwargs", {}))
    out = {"name": run["name"], "batches": []}
    started = time.time()
    eng = sglang.Engine(model_path=run["model"], **kw)
    try:
        sp = {"temperature": 0, "max_new_tokens": run["max_new_tokens"], "ignore_eos": True}
        for batch in run["batches"]:
            res = eng.generate(input_ids=[r["ids"] for r in batch], rid=[r["rid"] for r in batch],
                               sampling_params=sp, return_logprob=True)
            out["batches"].append({r["rid"]: {"tokens": g["output_ids"],
                                              "cached_tokens": g["meta_info"].get("cached_tokens"),
                                              "logprobs": [x[0] for x in g["meta_info"]["output_token_logprobs"]]}
                                   for r, g in zip(batch, res)})
        out["server_info"] = [st.get("depthkv") for st in eng.get_server_info()["internal_states"]]
        _await_idle_checks(started, int(kw.get("tp_size", 1)) * int(kw.get("dp_size", 1)))
    finally:
        eng.shutdown()
    keep = []
    if os.path.exists(dump):
        with open(dump) as f:
            keep = [json.loads(l) for l in f if l.strip()]
    out["keep"] = keep
    return out


def _await_idle_checks(since: float, schedulers: int) -> None:
    """Wait until ``schedulers`` processes have logged an idle check since ``since`` (no-op without
    the invariant log); TimeoutError after ``IDLE_WAIT_S``."""
    path = os.environ.get(INVARIANT_LOG_ENV)
    if not path:
        return
    deadline = time.time() + IDLE_WAIT_S
    while True:
        expired = time.time() > deadline
        try:
            lines = read_log(path) if os.path.exists(path) else []
        except ValueError:  # a line another process is still appending; a malformed log raises at the end
            if expired:
                raise
            lines = []
        pids = {r["pid"] for r in lines if r["kind"] == "idle" and r["t"] >= since}
        if len(pids) >= schedulers:
            return
        if expired:
            raise TimeoutError(f"{len(pids)} of {schedulers} scheduler processes logged an idle check "
                               f"in {IDLE_WAIT_S} s")
        time.sleep(0.1)


def run_spec(spec, env, timeout):
    """Run ``spec`` through this script in a subprocess (the tests' side): the runs by name and the
    subprocess's stderr. Fails the calling test on a missing RESULT line or a run's error."""
    import subprocess

    proc = subprocess.run([sys.executable, os.path.abspath(__file__), json.dumps(spec)], capture_output=True,
                          text=True, timeout=timeout, env=env)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert lines, f"no RESULT line (rc {proc.returncode})\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    res = {r["name"]: r for r in json.loads(lines[-1][len("RESULT "):])}
    for name, r in res.items():
        assert "error" not in r, f"{name}: {r.get('error_type')}: {r.get('error')}\n{r.get('traceback', '')}"
    return res, proc.stderr


def main():
    spec = json.loads(sys.argv[1])
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in spec["runs"]:
            try:
                results.append(run_one(run, tmp))
            except Exception as e:  # noqa: BLE001 - reported to the test
                results.append({"name": run["name"], "error_type": type(e).__name__, "error": str(e),
                                "traceback": traceback.format_exc()})
    print("RESULT " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
