"""Calibration: profile shape/validity, KL >= 0 and 0 when nothing is pruned, an independent
float64 recomputation of one (layer, fraction) entry, and the CLI (bytes tokenizer, tiny model)."""
import copy
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tiny_models  # noqa: E402

from sglang_depthkv.core import calibrate as C  # noqa: E402
from sglang_depthkv.core.reference import PrunedCache, ReferenceModel  # noqa: E402

N_CTX, N_CONT, SINKS, WINDOW = 48, 8, 2, 8


def _tokens(n, seed=0):
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model():
    return tiny_models.make_tiny_model("llama", seed=7)


def full_and_pruned_kl64(model, ctx, cont, layer, keep_l):
    """Independent: float64 eager forwards over ctx+cont; the pruned run hides, from continuation
    queries, the context keys that ``layer`` dropped (per-layer 4-D mask through a pre-hook)."""
    m = copy.deepcopy(model).double()
    m.config._attn_implementation = "eager"
    ids = torch.cat([ctx, cont])[None]
    n, T = ctx.numel(), ids.shape[1]
    with torch.no_grad():
        full = m(input_ids=ids).logits[0, n:]
    allowed = torch.tril(torch.ones(T, T, dtype=torch.bool))
    dropped = torch.ones(n, dtype=torch.bool)
    dropped[keep_l] = False
    allowed[n:, :n] &= ~dropped[None]
    mask = torch.zeros(T, T, dtype=torch.float64).masked_fill(~allowed, float("-inf"))[None, None]
    causal = torch.zeros(T, T, dtype=torch.float64).masked_fill(
        ~torch.tril(torch.ones(T, T, dtype=torch.bool)), float("-inf"))[None, None]

    def pre(mod, args, kwargs):
        kwargs = dict(kwargs)
        kwargs["attention_mask"] = mask if mod.layer_idx == layer else causal
        return args, kwargs

    hooks = [l.self_attn.register_forward_pre_hook(pre, with_kwargs=True) for l in m.model.layers]
    try:
        with torch.no_grad():
            pruned = m(input_ids=ids).logits[0, n:]
    finally:
        for h in hooks:
            h.remove()
    p = torch.softmax(full, -1)
    kl = (p * (torch.log(p) - torch.log_softmax(pruned, -1))).sum(-1)
    return float(kl.mean())


def test_keep_count_and_fraction_checks():
    assert C.keep_count(100, 0.1, 4, 8) == 12  # floor at sinks + window
    assert C.keep_count(100, 0.5, 4, 8) == 50
    assert C.keep_count(100, 1.0, 4, 8) == 100
    assert C.keep_count(10, 0.1, 4, 8) == 10  # short sequences are never pruned
    for bad in ([], [0.0, 0.5], [0.5, 0.2], [1.5], [float("nan")]):
        with pytest.raises(ValueError, match="keep-fractions"):
            C.check_fractions(bad)


def test_kl_matches_independent_float64_streamingllm(model):
    """StreamingLLM keeps [0, sinks) and the last k - sinks tokens: the keep set is known in
    closed form, so the whole entry (selection + pruned extension + KL) is checked independently."""
    ref = ReferenceModel(model)
    ctx, cont = _tokens(N_CTX, 1), _tokens(N_CONT, 2)
    fractions = [0.3, 0.6, 1.0]
    sens = C.sample_sensitivity(ref, ctx, cont, C.make_scorer("streamingllm"), fractions, SINKS, WINDOW)
    assert sens.shape == (ref.num_layers, 3)
    assert (sens >= 0).all() and (sens[:, -1] == 0).all()
    assert (sens[:, 0] > 0).all()
    for layer in (0, 2):
        k = C.keep_count(N_CTX, 0.3, SINKS, WINDOW)
        keep = torch.cat([torch.arange(SINKS), torch.arange(N_CTX - (k - SINKS), N_CTX)])
        expected = full_and_pruned_kl64(model, ctx, cont, layer, keep)
        assert sens[layer, 0].item() == pytest.approx(expected, rel=1e-3, abs=1e-7)


def test_kl_matches_independent_float64_snapkv(model):
    ref = ReferenceModel(model)
    ctx, cont = _tokens(N_CTX, 3), _tokens(N_CONT, 4)
    scorer = C.make_scorer("snapkv")
    sens = C.sample_sensitivity(ref, ctx, cont, scorer, [0.4], SINKS, WINDOW)
    pf = ref.prefill(ctx, window=WINDOW)
    keeps = C.layer_keep_sets(ref, pf, scorer, [0.4], SINKS, WINDOW)
    keep = keeps[1][0]
    assert keep.numel() == C.keep_count(N_CTX, 0.4, SINKS, WINDOW)
    assert set(range(SINKS)) | set(range(N_CTX - WINDOW, N_CTX)) <= set(keep.tolist())
    expected = full_and_pruned_kl64(model, ctx, cont, 1, keep)
    assert sens[1, 0].item() == pytest.approx(expected, rel=1e-3, abs=1e-7)


def test_pruning_nothing_gives_zero_kl(model):
    ref = ReferenceModel(model)
    ctx, cont = _tokens(N_CTX, 5), _tokens(N_CONT, 6)
    pf = ref.prefill(ctx, window=WINDOW)
    full = ref.extend(PrunedCache.from_prefill(pf, None), cont)
    again = ref.extend(PrunedCache.from_prefill(pf, [torch.arange(N_CTX)] * ref.num_layers), cont)
    assert C.kl_divergence(full, again).max().item() <= 1e-12


def test_calibrate_profile_via_cli(tmp_path, model):
    from sglang_depthkv.cli import main
    from sglang_depthkv.core.profile import load_profile

    d = tiny_models.save_tiny_model(tmp_path / "tiny", "qwen2", seed=1)
    text = tmp_path / "text.txt"
    text.write_text("It is a truth universally acknowledged, that a single man in possession " * 4)
    out = tmp_path / "profile.json"
    rc = main(["calibrate", "--model", str(d), "--text", str(text), "--tokenizer", "bytes", "--out", str(out),
               "--keep-fractions", "0.3,0.6,1.0", "--context-tokens", "64", "--continuation-tokens", "8",
               "--samples", "2", "--window", "8", "--sinks", "2"])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["format"] == "sglang-depthkv-profile" and data["version"] == 1
    assert data["scorer"] == "snapkv" and data["metric"] == "kl_next_token"
    assert data["keep_fractions"] == [0.3, 0.6, 1.0]
    assert data["calibration"]["pool_kernel"] == 7  # the kernel DepthKV will serve this profile with
    sens = torch.tensor(data["sensitivity"])
    assert sens.shape == (4, 3) and (sens >= 0).all() and (sens[:, -1] == 0).all() and (sens[:, 0] > 0).all()
    assert data["model"]["num_layers"] == 4 and data["model"]["num_key_value_heads"] == 2
    from sglang_depthkv.core.reference import load_hf_model, model_identity

    load_profile(out, model_identity(load_hf_model(d)))


def test_calibrate_without_out_writes_the_models_cache_entry(tmp_path, model, monkeypatch, capsys):
    """``--out`` omitted: the profile lands where the plugin looks for this model's profile."""
    from sglang_depthkv.cli import main
    from sglang_depthkv.core.profile_cache import find_cached_profile

    monkeypatch.setenv("SGLANG_DEPTHKV_CACHE", str(tmp_path / "cache"))
    d = tiny_models.save_tiny_model(tmp_path / "tiny", "llama", seed=2)
    text = tmp_path / "text.txt"
    text.write_text("It was the best of times, it was the worst of times, " * 4)
    assert find_cached_profile(d) is None
    rc = main(["calibrate", "--model", str(d), "--text", str(text), "--tokenizer", "bytes", "--scorer", "laprox",
               "--keep-fractions", "0.5,1.0", "--context-tokens", "48", "--continuation-tokens", "4",
               "--samples", "1", "--window", "4", "--sinks", "1"])
    assert rc == 0
    found = find_cached_profile(d)
    assert found is not None and found.parent == tmp_path / "cache" / "profiles" and found.name.endswith("-laprox.json")
    doc = json.loads(found.read_text())
    assert doc["scorer"] == "laprox" and doc["calibration"]["score"] == "kv-group output Frobenius norm"
    assert str(found) in capsys.readouterr().out


def test_hub_id_not_in_the_local_cache_is_refused_offline(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    err = _cli_error(capsys, ["calibrate", "--model", "someorg/somemodel"])
    assert "not in the local Hugging Face cache" in err and "does not download" in err


def _cli_error(capsys, argv):
    from sglang_depthkv.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_cli_errors(tmp_path, capsys):
    d = tiny_models.save_tiny_model(tmp_path / "tiny", "llama", seed=1)
    text = tmp_path / "t.txt"
    text.write_text("short text")
    base = ["calibrate", "--model", str(d), "--out", str(tmp_path / "p.json"), "--tokenizer", "bytes"]
    assert "--text" in _cli_error(capsys, base + ["--text", str(tmp_path / "missing.txt")])
    assert "need" in _cli_error(capsys, base + ["--text", str(text), "--context-tokens", "64"])
    assert "keep-fractions" in _cli_error(capsys, base + ["--text", str(text), "--keep-fractions", "0.5,0.2"])
    assert "unknown novel" in _cli_error(capsys, base + ["--novel", "ulysses"])
    assert "tokenizer" in _cli_error(capsys, base[:-2] + ["--text", str(text)])
    assert "not a directory" in _cli_error(capsys, ["calibrate", "--model", str(tmp_path / "nope"), "--out", "x",
                                                    "--text", str(text)])
    assert "--samples" in _cli_error(capsys, base + ["--text", str(text), "--samples", "0"])
    assert not (tmp_path / "p.json").exists()


def test_train_gates_cli(tmp_path, capsys):
    from sglang_depthkv.cli import main
    from sglang_depthkv.core.gates import load_gates
    from sglang_depthkv.core.reference import load_hf_model, model_identity

    d = tiny_models.save_tiny_model(tmp_path / "tiny", "qwen3", seed=2)
    text = tmp_path / "t.txt"
    text.write_text("She was the youngest of the two daughters of a most affectionate, indulgent father. " * 3)
    out = tmp_path / "g.safetensors"
    rc = main(["train-gates", "--model", str(d), "--text", str(text), "--tokenizer", "bytes", "--out", str(out),
               "--context-tokens", "64", "--samples", "2"])
    assert rc == 0
    gates = load_gates(out, model_identity(load_hf_model(d)))
    assert gates.weight.shape == (4, 2, 32 // 2 + 128)  # one norm per RoPE plane + the hidden state
    assert gates.training["text"] == str(text)
    assert "ridge" in _cli_error(capsys, ["train-gates", "--model", str(d), "--text", str(text), "--tokenizer",
                                          "bytes", "--out", str(out), "--ridge", "0"])


def test_calibrate_in_bfloat16_records_where_it_ran(tmp_path, capsys):
    """``--dtype bfloat16`` (the CUDA default) runs the whole calibration in that dtype; the profile
    records the device and dtype, and its sensitivities stay close to float32's."""
    from sglang_depthkv.cli import main

    d = tiny_models.save_tiny_model(tmp_path / "tiny", "llama", seed=3)
    text = tmp_path / "text.txt"
    text.write_text("It is a truth universally acknowledged, that a single man in possession " * 4)
    sens = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / f"{dtype}.json"
        assert main(["calibrate", "--model", str(d), "--text", str(text), "--tokenizer", "bytes", "--out", str(out),
                     "--device", "cpu", "--dtype", dtype, "--keep-fractions", "0.3,0.6", "--context-tokens", "64",
                     "--continuation-tokens", "8", "--samples", "1", "--window", "8", "--sinks", "2"]) == 0
        data = json.loads(out.read_text())
        assert (data["calibration"]["device"], data["calibration"]["dtype"]) == ("cpu", dtype)
        sens[dtype] = torch.tensor(data["sensitivity"])
    assert f"calibrate: tiny on cpu in bfloat16" in capsys.readouterr().out
    assert (sens["bfloat16"] >= 0).all() and (sens["float32"][:, 0] > 0).all()
    torch.testing.assert_close(sens["bfloat16"], sens["float32"], rtol=0.25, atol=0.02)


@pytest.mark.gpu
def test_calibrate_on_cuda_matches_the_cpu(tmp_path):
    """The calibration's GPU path: ``--device cuda --dtype float32`` gives the CPU's sensitivities (up to
    float rounding of different kernels), and the default on a CUDA machine is bfloat16 on CUDA."""
    from sglang_depthkv.cli import main

    d = tiny_models.save_tiny_model(tmp_path / "tiny", "llama", seed=3)
    text = tmp_path / "text.txt"
    text.write_text("It is a truth universally acknowledged, that a single man in possession " * 4)
    base = ["calibrate", "--model", str(d), "--text", str(text), "--tokenizer", "bytes", "--keep-fractions", "0.3,0.6",
            "--context-tokens", "64", "--continuation-tokens", "8", "--samples", "1", "--window", "8", "--sinks", "2"]
    sens = {}
    for name, extra in (("cpu", ["--device", "cpu"]), ("cuda", ["--device", "cuda", "--dtype", "float32"]),
                        ("auto", [])):
        out = tmp_path / f"{name}.json"
        assert main(base + ["--out", str(out)] + extra) == 0
        data = json.loads(out.read_text())
        sens[name] = torch.tensor(data["sensitivity"])
        if name == "auto":
            assert (data["calibration"]["device"], data["calibration"]["dtype"]) == ("cuda", "bfloat16")
    torch.testing.assert_close(sens["cuda"], sens["cpu"], rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(sens["auto"], sens["cpu"], rtol=0.25, atol=0.02)
