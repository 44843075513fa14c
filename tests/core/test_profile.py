import json
from dataclasses import replace

import pytest

from sglang_depthkv.core.profile import ProfileError, SensitivityProfile, load_profile, save_profile
from sglang_depthkv.core.types import ModelIdentity

IDENT = ModelIdentity(num_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8, hidden_size=32,
                      architecture="LlamaForCausalLM", name="tiny")


def good_doc():
    return {"format": "sglang-depthkv-profile", "version": 1,
            "model": {"num_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
                      "hidden_size": 32, "architecture": "LlamaForCausalLM", "name": "tiny"},
            "scorer": "snapkv", "keep_fractions": [0.1, 0.3, 0.5],
            "sensitivity": [[1.0, 0.5, 0.2], [2.0, 1.0, 0.1], [0.3, 0.2, 0.0]],
            "metric": "kl_next_token", "calibration": {"samples": 2}}


def write(tmp_path, doc, text=None):
    p = tmp_path / "p.json"
    p.write_text(text if text is not None else json.dumps(doc))
    return p


def test_round_trip(tmp_path):
    prof = SensitivityProfile(IDENT, "snapkv", [0.1, 0.3, 0.5], [[1.0, 0.5, 0.2], [2.0, 1.0, 0.1], [0.3, 0.2, 0.0]],
                              "kl_next_token", {"samples": 2})
    path = save_profile(prof, tmp_path / "sub" / "prof.json")
    back = load_profile(path, IDENT)
    assert back == prof and back.model == IDENT and back.calibration == {"samples": 2}
    assert json.loads(path.read_text()) == good_doc()
    assert back.curve(1) == [(0.1, 2.0), (0.3, 1.0), (0.5, 0.1), (1.0, 0.0)]


def test_load_without_expected_and_other_model_name_ok(tmp_path):
    p = write(tmp_path, good_doc())
    assert load_profile(p).num_layers == 3
    assert load_profile(p, replace(IDENT, name="other-name")).scorer == "snapkv"


def test_fraction_one_allowed_with_zero_kl(tmp_path):
    doc = good_doc()
    doc["keep_fractions"] = [0.3, 0.6, 1.0]
    doc["sensitivity"] = [[1.0, 0.5, 0.0]] * 3
    assert load_profile(write(tmp_path, doc)).curve(0)[-1] == (1.0, 0.0)
    doc["sensitivity"] = [[1.0, 0.5, 0.1]] * 3
    with pytest.raises(ProfileError, match="1.0 must be 0"):
        load_profile(write(tmp_path, doc))


def mutate(key, value):
    doc = good_doc()
    if value is KeyError:
        del doc[key]
    else:
        doc[key] = value
    return doc


@pytest.mark.parametrize("doc, match", [
    (mutate("format", "other"), "format"),
    (mutate("version", 2), "version 2"),
    (mutate("version", True), "version"),
    (mutate("sensitivity", KeyError), "missing keys sensitivity"),
    (mutate("calibration", KeyError), "missing keys calibration"),
    (mutate("extra", 1), "unknown keys extra"),
    (mutate("sensitivity", [[1.0, 0.5, 0.2], [2.0, 1.0, 0.1]]), r"sensitivity shape \(2 layers"),
    (mutate("sensitivity", [[1.0, 0.5], [2.0, 1.0], [0.3, 0.2]]), "len\\(keep_fractions\\)=3"),
    (mutate("keep_fractions", [0.1, 0.5, 0.3]), "strictly increasing"),
    (mutate("keep_fractions", [0.1, 0.1, 0.3]), "strictly increasing"),
    (mutate("keep_fractions", [0.0, 0.3, 0.5]), r"\(0, 1\]"),
    (mutate("keep_fractions", [0.1, 0.3, 1.5]), r"\(0, 1\]"),
    (mutate("keep_fractions", []), "non-empty"),
    (mutate("sensitivity", [[1.0, -0.5, 0.2], [2.0, 1.0, 0.1], [0.3, 0.2, 0.0]]), r"sensitivity\[0\]\[1\] = -0.5 is negative"),
    (mutate("sensitivity", [[1.0, 0.5, 0.2], [2.0, float("nan"), 0.1], [0.3, 0.2, 0.0]]), r"sensitivity\[1\]\[1\] is nan"),
    (mutate("sensitivity", [[1.0, 0.5, 0.2], [2.0, "x", 0.1], [0.3, 0.2, 0.0]]), "not a number"),
    (mutate("model", {"num_layers": 3}), "model' is missing"),
    (mutate("model", dict(good_doc()["model"], num_layers=0)), "model.num_layers"),
    (mutate("scorer", ""), "scorer"),
    (mutate("scorer", "kvzip"), "'scorer' 'kvzip' is not one DepthKV calibrates and serves with"),
    ([1, 2], "JSON object"),
])
def test_bad_files(tmp_path, doc, match):
    p = write(tmp_path, doc)
    with pytest.raises(ProfileError, match=match) as e:
        load_profile(p)
    assert str(p) in str(e.value)
    assert isinstance(e.value, ValueError)


def test_missing_file_and_bad_json(tmp_path):
    with pytest.raises(ProfileError, match="no such file") as e:
        load_profile(tmp_path / "nope.json")
    assert "nope.json" in str(e.value)
    with pytest.raises(ProfileError, match="invalid JSON"):
        load_profile(write(tmp_path, None, text="{not json"))


def test_other_model_names_fields(tmp_path):
    p = write(tmp_path, good_doc())
    other = replace(IDENT, num_layers=24, num_key_value_heads=1)
    with pytest.raises(ProfileError, match=r"profile is for 3 layers / 2 kv heads, model has 24 / 1") as e:
        load_profile(p, other)
    assert "num_layers: profile 3, model 24" in str(e.value) and str(p) in str(e.value)
    with pytest.raises(ProfileError, match="head_dim: profile 8, model 16"):
        load_profile(p, replace(IDENT, head_dim=16))
    with pytest.raises(ValueError, match="ModelIdentity"):
        load_profile(p, {"num_layers": 3})


def test_constructor_and_save_validate(tmp_path):
    with pytest.raises(ProfileError, match="sensitivity shape"):
        SensitivityProfile(IDENT, "snapkv", [0.1, 0.5], [[1.0, 0.5]])
    with pytest.raises(ValueError, match="SensitivityProfile"):
        save_profile(good_doc(), tmp_path / "x.json")


def test_recorded_pool_kernel_is_served_and_checked(tmp_path):
    """A profile records its scorer's pool kernel; DepthKV serves with that kernel, not the default."""
    from sglang_depthkv.core.policy import make_policy
    from sglang_depthkv.core.scorers.pooling import DEFAULT_POOL_KERNEL

    doc = good_doc()
    doc["calibration"]["pool_kernel"] = 5
    pol = make_policy("depthkv", 0.3, profile=load_profile(write(tmp_path, doc), IDENT))
    assert pol.scorer.name == "snapkv" and pol.scorer.pool_kernel == 5
    del doc["calibration"]["pool_kernel"]  # not recorded: the scorer's default kernel
    assert make_policy("depthkv", 0.3, profile=load_profile(write(tmp_path, doc))).scorer.pool_kernel == DEFAULT_POOL_KERNEL
    doc["calibration"]["pool_kernel"] = 4
    with pytest.raises(ProfileError, match="calibration.pool_kernel: SnapKVScorer: pool_kernel must be a positive odd"):
        load_profile(write(tmp_path, doc))
    doc.update(scorer="streamingllm", calibration={"pool_kernel": 5})
    with pytest.raises(ProfileError, match="'streamingllm' does not pool its scores"):
        load_profile(write(tmp_path, doc))


def test_laprox_profile_must_record_the_current_laprox_score(tmp_path):
    """A LaProx profile measured with another LaProx formula (none recorded: the earlier per-head
    norms) is refused with the command that re-calibrates it; the current formula's name loads, and
    calibration records it (``scorer_record``)."""
    from sglang_depthkv.core.scorers import LaProxScorer, scorer_record

    doc = good_doc()
    doc.update(scorer="laprox", calibration={"pool_kernel": 7})
    with pytest.raises(ProfileError, match=r"another laprox score \(none recorded\).*calibrate --scorer laprox"):
        load_profile(write(tmp_path, doc))
    doc["calibration"]["score"] = "per-head norms"
    with pytest.raises(ProfileError, match="another laprox score \\('per-head norms'\\)"):
        load_profile(write(tmp_path, doc))
    doc["calibration"] = scorer_record(LaProxScorer())
    assert doc["calibration"] == {"pool_kernel": 7, "score": "kv-group output Frobenius norm"}
    assert load_profile(write(tmp_path, doc), IDENT).scorer == "laprox"
    doc.update(scorer="snapkv", calibration={})  # SnapKV's formula never changed: nothing to record
    assert load_profile(write(tmp_path, doc), IDENT).scorer == "snapkv"
