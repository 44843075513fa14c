"""The per-model profile cache (``core/profile_cache.py``): keys follow the model's config and weight
files, the default scorer's profile is preferred, ambiguity is refused."""

import shutil

import pytest

from sglang_depthkv.core.profile_cache import cached_profile_path, find_cached_profile, model_key


def model_dir(path, config='{"model_type": "llama"}', weight_bytes=b"\0" * 10):
    path.mkdir(parents=True)
    (path / "config.json").write_text(config)
    (path / "model.safetensors").write_bytes(weight_bytes)
    return path


def test_key_follows_config_and_weight_files_not_the_path(tmp_path):
    a = model_dir(tmp_path / "a")
    b = tmp_path / "b"
    shutil.copytree(a, b)
    assert model_key(a) == model_key(b) and len(model_key(a)) == 16
    assert model_key(model_dir(tmp_path / "c", config='{"model_type": "qwen2"}')) != model_key(a)
    assert model_key(model_dir(tmp_path / "d", weight_bytes=b"\0" * 11)) != model_key(a)
    (b / "extra.safetensors").write_bytes(b"1")
    assert model_key(b) != model_key(a)


def test_key_needs_a_model_directory(tmp_path):
    with pytest.raises(ValueError, match="not a local model directory"):
        model_key(tmp_path / "missing")
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no weight files"):
        model_key(tmp_path / "e")


def test_find_prefers_the_default_scorer_and_refuses_ambiguity(tmp_path):
    m, root = model_dir(tmp_path / "m"), tmp_path / "cache"
    assert find_cached_profile(m, root) is None
    lap = cached_profile_path(m, "laprox", root)
    lap.parent.mkdir(parents=True)
    lap.write_text("{}")
    assert find_cached_profile(m, root) == lap  # the only one
    cached_profile_path(m, "streamingllm", root).write_text("{}")
    with pytest.raises(ValueError, match="several cached profiles"):
        find_cached_profile(m, root)
    snap = cached_profile_path(m, "snapkv", root)
    snap.write_text("{}")
    assert find_cached_profile(m, root) == snap
    other = model_dir(tmp_path / "other", config='{"model_type": "qwen3"}')
    assert find_cached_profile(other, root) is None
