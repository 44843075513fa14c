"""Flags and start-up validation: through SGLang's real CLI parser (``prepare_server_args``) and
through ``sglang.Engine(...)`` keywords, with the plugin loaded by SGLang's own plugin loader.
Every refusal happens while ``ServerArgs`` is built, before any subprocess is started: on the command
line as a usage error (one ``error: --flag: ...`` line on stderr, exit status 2, as argparse does), from
Python as a ``DepthKVConfigError``."""

import contextlib
import io
import json
import re
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sglang_depthkv.sglang.config import DepthKVConfigError, POLICY_CHOICES, parse_settings  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from dkv_support import make_profile  # noqa: E402


@pytest.fixture(scope="module")
def plugins():
    from sglang.srt.plugins import load_plugins

    load_plugins()
    from sglang_depthkv.patches.registry import missing_hooks

    assert missing_hooks() == []


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from tiny_models import save_tiny_model

    return str(save_tiny_model(tmp_path_factory.mktemp("llama"), "llama", seed=0))


@pytest.fixture(scope="module")
def swa_model(tmp_path_factory):
    from tiny_models import save_tiny_model

    d = save_tiny_model(tmp_path_factory.mktemp("qwen2swa"), "qwen2", seed=0)
    cfg = json.loads((d / "config.json").read_text())
    cfg["use_sliding_window"] = True
    cfg["sliding_window"] = 16
    (d / "config.json").write_text(json.dumps(cfg))
    return str(d)


def cli(model, *flags):
    from sglang.srt.server_args import prepare_server_args

    return prepare_server_args(["--model-path", model, "--device", "cpu", "--skip-tokenizer-init", *flags])


def refused(build, *args) -> DepthKVConfigError:
    """Run a command-line build (``cli`` / ``cuda_cli``) the plugin refuses: it exits as argparse does
    on a usage error (status 2) after writing ``error: <refusal>`` as the last stderr line (SGLang's own
    log lines may come first, never a traceback); the refusal is the exit's ``__cause__``."""
    err = io.StringIO()
    with pytest.raises(SystemExit) as e, contextlib.redirect_stderr(err):
        build(*args)
    assert e.value.code == 2
    cause = e.value.__cause__
    assert isinstance(cause, DepthKVConfigError), repr(cause)
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    assert lines[-1] == f"error: {cause}", lines
    assert not any("Traceback" in line for line in lines), lines
    return cause


# --- the settings on their own -------------------------------------------------------------------

@pytest.mark.parametrize(
    "raw, flag",
    [
        ({"kv_policy": "bogus", "kv_budget": 0.5}, "--kv-policy"),
        ({"kv_policy": "snapkv", "kv_budget": 0.0}, "--kv-budget"),
        ({"kv_policy": "snapkv", "kv_budget": 1.5}, "--kv-budget"),
        ({"kv_policy": "snapkv", "kv_budget": -0.1}, "--kv-budget"),
        ({"kv_policy": "snapkv", "kv_budget": float("nan")}, "--kv-budget"),
        ({"kv_policy": "snapkv", "kv_budget": "0.3"}, "--kv-budget"),
        ({"kv_policy": "full", "kv_budget": 0.5}, "--kv-budget"),
        ({"kv_policy": "kvzip", "kv_budget": 0.3}, "--kv-gates"),
        ({"kv_policy": "snapkv", "kv_budget": 0.3, "kv_profile": "p.json"}, "--kv-profile"),
        ({"kv_policy": "snapkv", "kv_budget": 0.3, "kv_gates": "g.pt"}, "--kv-gates"),
        ({"kv_policy": "snapkv", "kv_budget": 0.3, "kv_window": -1}, "--kv-window"),
        ({"kv_policy": "snapkv", "kv_budget": 0.3, "kv_sinks": 1.5}, "--kv-sinks"),
        ({"kv_policy": "snapkv", "kv_budget": 0.3, "kv_decode_interval": -2}, "--kv-decode-interval"),
        # decode-time pruning scores with the last --kv-window queries: none with a zero window
        ({"kv_policy": "snapkv", "kv_budget": 0.3, "kv_window": 0, "kv_decode_interval": 4}, "--kv-decode-interval"),
        ({"kv_budget": 0.3}, "--kv-budget"),  # a kv flag without a policy would be silently ignored
    ],
)
def test_parse_settings_refuses(raw, flag):
    with pytest.raises(DepthKVConfigError) as e:
        parse_settings(raw)
    assert str(e.value).startswith(flag + ":"), str(e.value)
    assert isinstance(e.value, ValueError)


def test_parse_settings_defaults():
    assert parse_settings({}) is None
    s = parse_settings({"kv_policy": "full"})
    assert (s.policy, s.budget, s.sinks, s.window, s.decode_interval) == ("full", 1.0, 4, 32, 0)
    assert parse_settings({"kv_policy": "snapkv"}).budget == 0.3  # the documented default budget
    s = parse_settings({"kv_policy": "streamingllm", "kv_budget": 0.25, "kv_window": 8, "kv_sinks": 2})
    assert (s.budget, s.window, s.sinks) == (0.25, 8, 2)
    s = parse_settings({"kv_policy": "snapkv", "kv_budget": 0.3, "kv_window": 0})  # prefill-only pruning
    assert (s.window, s.decode_interval) == (0, 0)


# --- CLI ------------------------------------------------------------------------------------------

def test_help_shows_flags(plugins):
    import argparse

    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    text = parser.format_help()
    for flag in ("--kv-policy", "--kv-budget", "--kv-profile", "--kv-gates", "--kv-window", "--kv-sinks",
                 "--kv-decode-interval"):
        assert flag in text
    for p in POLICY_CHOICES:
        assert p in text


def test_cli_accepts_and_attaches(plugins, llama):
    sa = cli(llama, "--kv-policy", "snapkv", "--kv-budget", "0.5", "--kv-window", "8")
    s = sa._depthkv_settings
    assert (s.policy, s.budget, s.window) == ("snapkv", 0.5, 8)
    assert sa.attention_backend == "torch_native"
    # survives the pickle into the scheduler process
    import pickle

    assert pickle.loads(pickle.dumps(sa))._depthkv_settings == s


def test_default_backend_under_kv_policy():
    """Unset --attention-backend under --kv-policy: triton on CUDA (CUDA-graph capable), torch_native
    on CPU; a backend the user names is never replaced (tested above / in test_cli_refuses)."""
    from sglang_depthkv.sglang.config import default_attention_backend

    assert default_attention_backend("cuda") == "triton"
    assert default_attention_backend("cuda:1") == "triton"
    assert default_attention_backend("cpu") == "torch_native"
    assert default_attention_backend(None) == ("triton" if torch.cuda.is_available() else "torch_native")


def test_cli_keeps_the_named_backend(plugins, llama):
    sa = cli(llama, "--kv-policy", "snapkv", "--kv-budget", "0.5", "--attention-backend", "triton")
    assert sa.attention_backend == "triton"


def test_cli_without_policy_is_vanilla(plugins, llama):
    sa = cli(llama)
    assert getattr(sa, "_depthkv_settings", None) is None


def test_cli_unknown_policy_is_an_argparse_error(plugins, llama, capsys):
    with pytest.raises(SystemExit):
        cli(llama, "--kv-policy", "bogus")
    assert "--kv-policy" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, flag",
    [
        (["--kv-policy", "snapkv", "--kv-budget", "1.5"], "--kv-budget"),
        (["--kv-policy", "snapkv", "--kv-budget", "0"], "--kv-budget"),
        (["--kv-policy", "kvzip", "--kv-budget", "0.3"], "--kv-gates"),
        (["--kv-policy", "depthkv", "--kv-budget", "0.3", "--kv-profile", "none"], "--kv-profile"),
        (["--kv-policy", "full", "--page-size", "16"], "--page-size"),
        (["--kv-policy", "full", "--attention-backend", "flashinfer"], "--attention-backend"),
        (["--kv-policy", "full", "--enable-hierarchical-cache"], "--enable-hierarchical-cache"),
        (["--kv-policy", "full", "--speculative-algorithm", "NGRAM"], "--speculative-algorithm"),
        (["--kv-policy", "full", "--pp-size", "2"], "--pp-size"),
        (["--kv-policy", "snapkv", "--kv-budget", "0.3", "--tp-size", "2", "--dp-size", "2", "--enable-dp-attention"],
         "--enable-dp-attention"),
        (["--kv-policy", "snapkv", "--kv-budget", "0.01", "--context-length", "1000"], "--kv-budget"),
    ],
)
def test_cli_refuses(plugins, llama, flags, flag):
    e = refused(cli, llama, *flags)
    assert str(e).startswith(flag + ":"), str(e)


def test_cli_accepts_tensor_and_data_parallel(plugins, llama):
    """Plain ``--tp-size`` / ``--dp-size`` pass start-up validation (no DP attention)."""
    sa = cli(llama, "--kv-policy", "snapkv", "--kv-budget", "0.3", "--tp-size", "2", "--dp-size", "2")
    assert (sa.tp_size, sa.dp_size, sa._depthkv_settings.policy) == (2, 2, "snapkv")


def test_cli_refuses_laprox_over_replicated_kv_heads(plugins, llama, tmp_path):
    """LaProx scores a token from all query heads of its kv head together: more tensor-parallel ranks
    than kv heads (the tiny Llama has 2) split them over ranks, refused for --kv-policy laprox and for
    a DepthKV profile calibrated with LaProx, and only then."""
    e = refused(cli, llama, "--kv-policy", "laprox", "--kv-budget", "0.3", "--tp-size", "4")
    assert str(e).startswith("--tp-size: 4 exceeds the model's 2 kv heads"), str(e)
    assert "--kv-policy laprox" in str(e) and str(e).endswith("use --tp-size <= 2"), str(e)
    prof = str(make_profile(tmp_path / "laprox.json", scorer="laprox"))
    e = refused(cli, llama, "--kv-policy", "depthkv", "--kv-budget", "0.3", "--kv-profile", prof, "--tp-size", "4")
    assert "a --kv-profile calibrated with laprox" in str(e), str(e)
    assert cli(llama, "--kv-policy", "laprox", "--kv-budget", "0.3", "--tp-size", "2")._depthkv_settings
    assert cli(llama, "--kv-policy", "snapkv", "--kv-budget", "0.3", "--tp-size", "4")._depthkv_settings
    snap = str(make_profile(tmp_path / "snapkv.json"))
    assert cli(llama, "--kv-policy", "depthkv", "--kv-budget", "0.3", "--kv-profile", snap, "--tp-size", "4")._depthkv_settings


def test_cli_refuses_torch_compile(plugins, llama):
    """The per-layer pool swap and the scoring hooks are Python per layer: not compile-safe."""
    assert str(refused(cli, llama, "--kv-policy", "full", "--enable-torch-compile")).startswith("--enable-torch-compile:")


def test_cli_refuses_quantized_weights_for_laprox(plugins, llama, tmp_path):
    """LaProx reads o_proj.weight as a float matrix: --quantization and quantized checkpoints are
    refused for it (and only for it)."""
    e = refused(cli, llama, "--kv-policy", "laprox", "--kv-budget", "0.3", "--quantization", "fp8")
    assert str(e).startswith("--quantization: 'fp8' not supported with --kv-policy laprox"), str(e)
    assert cli(llama, "--kv-policy", "snapkv", "--kv-budget", "0.3", "--quantization", "fp8")._depthkv_settings

    quant = tmp_path / "fp8"
    quant.mkdir()
    for f in Path(llama).iterdir():
        (quant / f.name).symlink_to(f)
    cfg = json.loads((Path(llama) / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    (quant / "config.json").unlink()
    (quant / "config.json").write_text(json.dumps(cfg))
    e = refused(cli, str(quant), "--kv-policy", "laprox", "--kv-budget", "0.3")
    assert str(e).startswith("--model-path: quantized checkpoint (fp8)"), str(e)


# --- CUDA-shaped ServerArgs (built on any machine: device="cuda" resolves without a GPU) -----------

@pytest.fixture
def cuda_host(monkeypatch):
    """SGLang's prefill CUDA-graph default as on a CUDA host: ``default_prefill_backend`` asks
    ``sglang.srt.utils.is_cuda`` at call time (breakable on CUDA, tc_piecewise elsewhere)."""
    import sglang.srt.utils

    monkeypatch.setattr(sglang.srt.utils, "is_cuda", lambda: True)


def cuda_cli(model, *flags):
    from sglang.srt.server_args import prepare_server_args

    return prepare_server_args(["--model-path", model, "--device", "cuda", "--skip-tokenizer-init", *flags])


def test_cuda_prefill_graph_turned_off(plugins, llama, cuda_host):
    """SGLang captures prefill with its breakable CUDA graph by default on CUDA; the capture builds a
    ForwardBatch without ``init_new``, so the plugin's hooks would not run. Under --kv-policy the
    plugin sets SGLang's own --disable-prefill-cuda-graph (one INFO line); decode graphs stay on."""
    import logging

    from sglang.srt.server_args import ServerArgs

    vanilla = cuda_cli(llama)
    assert vanilla.cuda_graph_config.prefill.backend == "breakable"  # the CUDA default being overridden
    records = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append  # SGLang's prepare_server_args re-configures the root logger's handlers
    logger = logging.getLogger("sglang_depthkv")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        built = [cuda_cli(llama, "--kv-policy", "snapkv", "--kv-budget", "0.5"),
                 ServerArgs(model_path=llama, device="cuda", skip_tokenizer_init=True, kv_policy="snapkv",
                            kv_budget=0.5)]
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    for sa in built:
        assert sa.disable_prefill_cuda_graph
        assert sa.cuda_graph_config.prefill.backend == "disabled"
        assert sa.cuda_graph_config.decode.backend == "full"
        assert sa.attention_backend == "triton"
    lines = [r for r in records if "--disable-prefill-cuda-graph" in r.getMessage()]
    assert len(lines) == 2 and all(r.levelno == logging.INFO for r in lines)  # one per ServerArgs
    # an explicit "disabled" is accepted as is
    sa = cuda_cli(llama, "--kv-policy", "full", "--cuda-graph-backend-prefill", "disabled")
    assert sa.cuda_graph_config.prefill.backend == "disabled"


@pytest.mark.parametrize(
    "flags, flag",
    [
        (["--cuda-graph-backend-prefill", "breakable"], "--cuda-graph-backend-prefill"),
        (["--cuda-graph-backend-prefill", "full"], "--cuda-graph-backend-prefill"),
        (["--cuda-graph-config", '{"prefill": {"backend": "tc_piecewise"}}'], "--cuda-graph-config"),
        # the JSON wins over the per-phase flag in SGLang's precedence; so it does here
        (["--cuda-graph-backend-prefill", "disabled", "--cuda-graph-config", '{"prefill": {"backend": "breakable"}}'],
         "--cuda-graph-config"),
    ],
)
def test_cuda_prefill_graph_explicit_refused(plugins, llama, cuda_host, flags, flag):
    e = refused(cuda_cli, llama, "--kv-policy", "snapkv", "--kv-budget", "0.5", *flags)
    assert str(e).startswith(flag + ": prefill CUDA graph backend"), str(e)


def test_cuda_prefill_graph_refused_after_resolution(plugins, llama):
    """The check on the resolved ``ServerArgs`` refuses a prefill graph however it got there."""
    from sglang.srt.server_args import ServerArgs

    from sglang_depthkv.sglang.config import check_server_args

    sa = ServerArgs(model_path=llama, device="cuda", skip_tokenizer_init=True, attention_backend="triton",
                    cuda_graph_backend_prefill="breakable")  # vanilla: SGLang keeps the explicit choice
    assert sa.cuda_graph_config.prefill.backend == "breakable"
    with pytest.raises(DepthKVConfigError, match="^--cuda-graph-backend-prefill:"):
        check_server_args(parse_settings({"kv_policy": "full"}), sa)


@pytest.mark.parametrize("name", ["attention_backend", "prefill_attention_backend", "decode_attention_backend"])
def test_cuda_refuses_torch_native(plugins, llama, name):
    """torch_native on CUDA: host syncs at every layer and SGLang turns CUDA graphs off for it."""
    from sglang.srt.server_args import ServerArgs

    flag = "--" + name.replace("_", "-")
    with pytest.raises(DepthKVConfigError, match=f"^{flag}: 'torch_native' on CUDA") as e:
        ServerArgs(model_path=llama, device="cuda", skip_tokenizer_init=True, kv_policy="full",
                   **{name: "torch_native"})
    assert "triton" in str(e.value)


def test_cli_refuses_sliding_window_model(plugins, swa_model):
    assert str(refused(cli, swa_model, "--kv-policy", "full")).startswith("--model-path: sliding-window")


def test_cli_depthkv_profile_accepted_and_sizes_layers(plugins, llama, tmp_path):
    from transformers import AutoConfig

    from sglang_depthkv.sglang.capacity import policy_layer_fractions

    prof = make_profile(tmp_path / "p.json")
    sa = cli(llama, "--kv-policy", "depthkv", "--kv-budget", "0.4", "--kv-profile", str(prof))
    s = sa._depthkv_settings
    fr = policy_layer_fractions(s, 4, AutoConfig.from_pretrained(llama))
    assert abs(sum(fr) / 4 - 0.4) < 1e-9  # mean keep fraction == budget
    assert fr[0] < fr[3]  # layer 3 is the most sensitive at low keep fractions here


def test_cli_depthkv_without_profile_uses_the_models_cached_profile(plugins, llama, tmp_path, monkeypatch):
    """No --kv-profile: the profile ``calibrate --model M`` caches for this model directory is used;
    none cached: calibrated at start-up (one rank only, else a refusal naming the command), and
    ``--kv-profile none`` refuses in one line naming the command that writes one."""
    from sglang_depthkv.core.profile_cache import cached_profile_path

    monkeypatch.setenv("SGLANG_DEPTHKV_CACHE", str(tmp_path / "cache"))
    s = cli(llama, "--kv-policy", "depthkv")._depthkv_settings
    assert (s.profile, s.calibrate_at_start) == (None, True)
    e = refused(cli, llama, "--kv-policy", "depthkv", "--kv-profile", "none")
    assert str(e).startswith("--kv-profile: none: ") and "start-up calibration is off" in str(e) and \
        f"run `python -m sglang_depthkv calibrate --model {llama}` once" in str(e), str(e)
    e = refused(cli, llama, "--kv-policy", "depthkv", "--tp-size", "2")
    assert str(e).startswith("--kv-profile: not given, ") and "--tp-size 2" in str(e) and \
        f"run `python -m sglang_depthkv calibrate --model {llama}` once" in str(e), str(e)
    path = cached_profile_path(llama)
    path.parent.mkdir(parents=True)
    make_profile(path)
    for extra in ((), ("--kv-profile", "none")):
        s = cli(llama, "--kv-policy", "depthkv", *extra)._depthkv_settings
        assert (s.profile, s.budget, s.calibrate_at_start) == (str(path), 0.3, False)
    assert cli(llama, "--kv-policy", "depthkv", "--kv-profile", str(make_profile(tmp_path / "x.json"))
               )._depthkv_settings.profile == str(tmp_path / "x.json")  # an explicit profile wins


@pytest.mark.parametrize("case", ["other_model", "bad_json", "bad_version", "missing", "negative"])
def test_cli_refuses_bad_profiles(plugins, llama, tmp_path, case):
    p = tmp_path / "p.json"
    if case == "other_model":
        make_profile(p, num_layers=32)
    elif case == "bad_json":
        p.write_text("{not json")
    elif case == "bad_version":
        make_profile(p)
        doc = json.loads(p.read_text())
        doc["version"] = 99
        p.write_text(json.dumps(doc))
    elif case == "negative":
        make_profile(p)
        doc = json.loads(p.read_text())
        doc["sensitivity"][1][0] = -1.0
        p.write_text(json.dumps(doc))
    assert str(refused(cli, llama, "--kv-policy", "depthkv", "--kv-budget", "0.3", "--kv-profile", str(p))
               ).startswith("--kv-profile:")


def test_cli_refuses_bad_gate_file(plugins, llama, tmp_path):
    g = tmp_path / "gates.bin"
    g.write_bytes(b"not a gate file")
    assert str(refused(cli, llama, "--kv-policy", "kvzip", "--kv-budget", "0.3", "--kv-gates", str(g))
               ).startswith("--kv-gates:")


# --- Engine(...) keywords -------------------------------------------------------------------------

@pytest.mark.parametrize(
    "kw, flag",
    [
        (dict(kv_policy="snapkv", kv_budget=1.5), "--kv-budget"),
        (dict(kv_policy="kvzip", kv_budget=0.3), "--kv-gates"),
        (dict(kv_policy="full", page_size=4), "--page-size"),
        (dict(kv_policy="nope"), "--kv-policy"),
        (dict(kv_budget=0.3), "--kv-budget"),
    ],
)
def test_engine_keywords_refused_before_launch(plugins, llama, kw, flag):
    import sglang

    with pytest.raises(DepthKVConfigError) as e:
        sglang.Engine(model_path=llama, device="cpu", skip_tokenizer_init=True, max_total_tokens=256, **kw)
    assert str(e.value).startswith(flag + ":"), str(e.value)


def test_server_args_keywords_attach(plugins, llama):
    from sglang.srt.server_args import ServerArgs

    sa = ServerArgs(model_path=llama, device="cpu", skip_tokenizer_init=True, kv_policy="streamingllm",
                    kv_budget=0.5, kv_sinks=2)
    assert sa._depthkv_settings.sinks == 2 and sa.attention_backend == "torch_native"


def test_missing_hook_is_a_hard_error(plugins, llama, monkeypatch):
    """SGLang only logs a hook it failed to apply; the plugin's self-check refuses to run then."""
    from sglang.srt.plugins.hook_registry import HookRegistry

    from sglang_depthkv.patches.registry import HOOK_TARGETS, HookNotAppliedError

    lost = "sglang.srt.mem_cache.registry.create_tree_cache"
    assert lost in HOOK_TARGETS
    monkeypatch.setattr(HookRegistry, "_patched", set(HookRegistry._patched) - {lost})
    with pytest.raises(HookNotAppliedError, match="create_tree_cache"):
        cli(llama, "--kv-policy", "full")
    # vanilla (no --kv-policy) is not affected
    assert getattr(cli(llama), "_depthkv_settings", None) is None


def test_server_args_refusal_is_a_value_error(plugins, llama):
    """From Python the refusal stays an exception (no exit), with the same message as on the CLI."""
    from sglang.srt.server_args import ServerArgs

    with pytest.raises(DepthKVConfigError, match=re.escape("--kv-budget: must be in (0, 1], got 1.5")):
        ServerArgs(model_path=llama, device="cpu", skip_tokenizer_init=True, kv_policy="snapkv", kv_budget=1.5)
    with pytest.raises(ValueError, match="^--page-size: 2 not supported"):
        ServerArgs(model_path=llama, device="cpu", skip_tokenizer_init=True, kv_policy="full", page_size=2)


# --- the real entry point: python -m sglang.launch_server ------------------------------------------

# Log lines of a start that got as far as the model (scheduler process, weight loading).
STARTED = ("Load weight", "Loading safetensors", "Init torch distributed", "server_args=ServerArgs")


def _launch(*args, **env_overrides):
    import os
    import subprocess

    env = dict(os.environ, SGLANG_USE_CPU_ENGINE="1", OMP_NUM_THREADS="1", **env_overrides)
    return subprocess.run([sys.executable, "-m", "sglang.launch_server", *args], capture_output=True, text=True,
                          timeout=240, env=env)


def test_launch_server_help(llama):
    h = _launch("--help")
    assert h.returncode == 0
    for flag in ("--kv-policy", "--kv-budget", "--kv-profile", "--kv-gates", "--kv-window", "--kv-sinks",
                 "--kv-decode-interval"):
        assert flag in h.stdout


@pytest.mark.parametrize(
    "case, flags, expected, alone",
    [
        # parse_settings, before ServerArgs resolves; SGLang's import-time UserWarnings silenced: the
        # refusal is then the whole of stderr
        ("flag value", ["--kv-policy", "snapkv", "--kv-budget", "1.5"],
         "error: --kv-budget: must be in (0, 1], got 1.5", True),
        # check_server_args, after ServerArgs resolved; SGLang's warnings and log lines come first
        ("SGLang flag", ["--kv-policy", "snapkv", "--kv-budget", "0.5", "--page-size", "2"],
         "error: --page-size: 2 not supported with --kv-policy (page_size 1 only: pruning frees single tokens; "
         "paged allocators free whole pages)", False),
        # check_model, on the model's config.json
        ("model", ["--kv-policy", "full"],
         "error: --model-path: sliding-window attention models are not supported with --kv-policy", False),
    ],
)
def test_launch_server_refusal_is_a_usage_error(llama, swa_model, case, flags, expected, alone):
    """A refused configuration through ``python -m sglang.launch_server``: exit status 2 and the
    refusal as the last stderr line, as argparse reports a bad flag; no traceback, no plugin line
    before it, and nothing started (no scheduler, no weight loaded)."""
    model = swa_model if case == "model" else llama
    env = {"PYTHONWARNINGS": "ignore::UserWarning"} if alone else {}
    t0 = time.monotonic()
    p = _launch("--model-path", model, "--device", "cpu", *flags, **env)
    elapsed = time.monotonic() - t0
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2, p.stderr[-3000:]
    assert lines[-1] == expected, lines
    if alone:
        assert lines == [expected], lines  # refused before SGLang resolves (and logs) anything
    assert not any(re.search(r"sglang-depthkv[: ]|DepthKV", line) for line in lines[:-1]), lines  # said once
    out = p.stdout + p.stderr
    assert "Traceback" not in out, out[-3000:]
    assert not any(marker in out for marker in STARTED), out[-3000:]
    assert elapsed < 90, elapsed  # SGLang's imports only (a start loads the model in a scheduler)
