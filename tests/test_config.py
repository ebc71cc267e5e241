"""Configs from mappings, dataclasses and every file format, and their errors."""

import json

import pytest
import torch
from _reference import pattern_attention, softmax_attention, visible

import sparse_linear_attn as sla


def qkv():
    return torch.randn(2, 2, 10, 8), torch.randn(2, 2, 10, 8), torch.randn(2, 2, 10, 8)


def check_causal_full(layer):
    q, k, v = qkv()
    kpm = torch.zeros(2, 10, dtype=torch.bool)
    kpm[1, 7:] = True
    out = layer(q, k, v, key_padding_mask=kpm)
    ref, _ = softmax_attention(q, k, v, visible(10, 10, causal=True, key_padding_mask=kpm, batch=2), scale=0.5)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    out, w = layer(q, k, v, return_weights=True)
    assert w.shape == (2, 2, 10, 10)


FILES = {
    "cfg.json": json.dumps({"variant": "full", "causal": True, "scale": 0.5}),
    "cfg.yaml": "variant: full\ncausal: true\nscale: 0.5\n",
    "cfg.yml": "variant: full\ncausal: true\nscale: 0.5\n",
    "cfg.toml": 'variant = "full"\ncausal = true\nscale = 0.5\n',
}


@pytest.mark.parametrize("name", sorted(FILES))
def test_build_from_every_file_format(tmp_path, name):
    path = tmp_path / name
    path.write_text(FILES[name])
    check_causal_full(sla.build(path))
    check_causal_full(sla.build(str(path)))


def test_build_from_mapping_and_dataclass():
    check_causal_full(sla.build({"variant": "full", "causal": True, "scale": 0.5}))
    cfg = sla.AttentionConfig(variant="full", causal=True, scale=0.5)
    check_causal_full(sla.build(cfg))
    assert sla.AttentionConfig.from_mapping(cfg.to_dict()) == cfg
    cfg = sla.AttentionConfig.from_mapping({"variant": "additive", "hidden_dim": 16, "head_dim": 8})
    assert cfg.params == {"hidden_dim": 16, "head_dim": 8}
    assert cfg.to_dict()["hidden_dim"] == 16


def test_build_learned_variant_from_file(tmp_path):
    path = tmp_path / "add.yaml"
    path.write_text("variant: additive\nhead_dim: 8\nhidden_dim: 12\ncausal: true\n")
    layer = sla.build(path)
    assert layer.impl.w_q.shape == (12, 8)
    q, k, v = qkv()
    assert layer(q, k, v).shape == (2, 2, 10, 8)


def test_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        sla.build(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "name,text",
    [("bad.json", "{variant: full"), ("bad.yaml", "variant: [full\n"), ("bad.toml", "variant = \n")],
)
def test_unparseable_file_names_it(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=f"could not parse attention config file .*{name}"):
        sla.build(tmp_path / name)


def test_yaml_is_loaded_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("variant: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ValueError, match="could not parse"):
        sla.build(path)


def test_other_file_errors(tmp_path):
    (tmp_path / "cfg.ini").write_text("variant=full")
    with pytest.raises(ValueError, match=r"suffix '.ini'; accepted: .json, .yaml, .yml, .toml"):
        sla.build(tmp_path / "cfg.ini")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a mapping"):
        sla.build(tmp_path / "list.json")


@pytest.mark.parametrize(
    "cfg,match",
    [
        ({"variant": "full", "causal": "yes"}, "'causal' must be True or False"),
        ({"variant": "full", "scale": "big"}, "'scale' must be a finite number"),
        ({"variant": "full", "scale": float("nan")}, "'scale' must be a finite number"),
        ({"variant": "full", "scale": float("inf")}, "'scale' must be a finite number"),
        ({"variant": 3}, "'variant' must be a string"),
        ({"variant": "full", "window": 4}, "unknown parameter"),
    ],
)
def test_bad_config_values(cfg, match):
    with pytest.raises(ValueError, match=match):
        sla.build(cfg)
    with pytest.raises(TypeError):
        sla.build(42)


def test_build_keeps_its_own_copy_of_the_config():
    cfg = sla.AttentionConfig("sliding_window", causal=False, params={"window": 2})
    layer = sla.build(cfg)
    before = repr(layer)
    cfg.causal = True
    cfg.params["window"] = 100
    cfg.backend = "math"
    assert repr(layer) == before and "window=2" in before and "causal=False" in before
    assert layer.config == sla.AttentionConfig("sliding_window", params={"window": 2})
    q, k, v = qkv()
    band = (torch.arange(10)[:, None] - torch.arange(10)[None, :]).abs() <= 2
    ref, _ = pattern_attention(q, k, v, band, scale=8**-0.5)
    torch.testing.assert_close(layer(q, k, v).double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "name,text",
    [
        ("dup.json", '{"variant": "sliding_window", "window": 4, "window": 8}'),
        ("dup.yaml", "variant: sliding_window\nwindow: 4\nwindow: 8\n"),
        ("dup_nested.yaml", "variant: sliding_window\nparams:\n  window: 4\n  window: 8\n"),
    ],
)
def test_duplicate_keys_are_refused_in_every_format(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=rf"(?s){name}.*duplicate key 'window'"):
        sla.build(tmp_path / name)


def test_yaml_merge_keys_still_override(tmp_path):
    # A '<<' merge followed by an explicit key is YAML's own way to override, not a duplicate.
    (tmp_path / "merge.yaml").write_text("variant: sliding_window\nparams:\n  <<: {window: 4}\n  window: 8\n")
    assert sla.build(tmp_path / "merge.yaml").params == {"window": 8, "sinks": 0}


@pytest.mark.parametrize("name,text", [("e.toml", ""), ("e.json", "{}"), ("e.yaml", "{}\n"), ("e2.yaml", "")])
def test_empty_files_are_refused(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=rf"{name}.*(holds no keys|must hold a mapping)"):
        sla.build(tmp_path / name)


def test_parameter_given_nested_and_flat_is_refused(tmp_path):
    cfg = {"variant": "sliding_window", "window": 4, "params": {"window": 8}}
    with pytest.raises(ValueError, match=r"'window' is given both at the top level and under 'params'"):
        sla.build(cfg)
    (tmp_path / "both.yaml").write_text("variant: sliding_window\nwindow: 4\nparams:\n  window: 8\n")
    with pytest.raises(ValueError, match=r"'window' is given both"):
        sla.build(tmp_path / "both.yaml")
    assert sla.build({"variant": "sliding_window", "params": {"window": 8}}).params == {"window": 8, "sinks": 0}


def test_directory_and_undecodable_files_are_named(tmp_path):
    (tmp_path / "cfg.yaml").mkdir()
    with pytest.raises(IsADirectoryError, match=r"cfg.yaml.*is a directory"):
        sla.build(tmp_path / "cfg.yaml")
    (tmp_path / "latin1.yaml").write_bytes("variant: full\n# café\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.yaml.*not valid UTF-8"):
        sla.build(tmp_path / "latin1.yaml")


@pytest.mark.parametrize("name", sorted(FILES))
def test_utf8_bom_is_accepted(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + FILES[name].encode())
    check_causal_full(sla.build(path))


def test_numpy_scalars_are_accepted_where_python_ones_are():
    np = pytest.importorskip("numpy")
    layer = sla.build(
        {"variant": "sliding_window", "window": np.int64(2), "causal": np.bool_(False), "scale": np.float32(0.5)}
    )
    assert layer.params == {"window": 2, "sinks": 0} and type(layer.params["window"]) is int
    layer = sla.build({"variant": "block_sparse", "block_size": np.int32(4), "pattern": np.str_("bigbird")})
    assert layer.params["block_size"] == 4
