"""Built modules and layers survive pickle, torch.save/torch.load and spawn-based workers."""

import io
import multiprocessing
import pickle

import torch
from torch import nn

import sparse_linear_attn as sla
from sparse_linear_attn import registry

D = 8


def config_for(name: str) -> dict:
    """A small config of each registered variant: its first example (if any), head_dim = D."""
    spec = registry.get(name)
    cfg = {"variant": name, **(dict(spec.examples[0]) if spec.examples else {})}
    if "head_dim" in spec.params:
        cfg["head_dim"] = D
    return cfg


def qkv(n=24):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(2, 2, n, D, generator=g, dtype=torch.float64) for _ in range(3))


def run_module(module: nn.Module) -> torch.Tensor:
    """What the spawned workers compute (module-level so that the worker can import it)."""
    with torch.no_grad():
        return module.double()(*qkv())


def test_every_variant_pickles_and_runs_the_same():
    q, k, v = qkv()
    for name in sla.available_variants():
        module = sla.build(config_for(name)).double()
        back = pickle.loads(pickle.dumps(module))
        assert repr(back) == repr(module), name
        torch.testing.assert_close(back(q, k, v), module(q, k, v), rtol=0, atol=0, msg=name)


def test_validators_pickle_with_a_readable_repr():
    for name in sla.available_variants():
        for p in registry.get(name).params.values():
            if p.check is not None:
                assert pickle.loads(pickle.dumps(p.check)) == p.check, (name, p.name)
                assert "<locals>" not in repr(p.check) and "lambda" not in repr(p.check), repr(p.check)
    assert repr(registry.int_at_least(2)) == "int_at_least(2)"
    assert repr(registry.one_of("a", "b")) == "one_of('a', 'b')"


def test_swapped_model_saves_and_loads_whole():
    x = torch.randn(2, 24, 16)
    for name in sla.available_variants():
        model = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True), 2
        )
        sla.swap_attention(model, config_for(name))
        model.eval()
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        back = torch.load(buf, weights_only=False)
        back.eval()
        with torch.no_grad():
            torch.testing.assert_close(back(x), model(x), rtol=0, atol=0, msg=name)


def test_spawned_workers_run_every_variant():
    names = sla.available_variants()
    modules = [sla.build(config_for(n)) for n in names]
    expected = [run_module(m) for m in modules]
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        got = pool.map(run_module, modules)
    for name, e, g in zip(names, expected, got):
        torch.testing.assert_close(g, e, rtol=0, atol=0, msg=name)


def user_attention(q, k, v, *, causal, key_padding_mask, scale, alpha=1.0):
    return alpha * v


def test_user_registered_variant_pickles():
    sla.register_variant("_pickled_user")(user_attention)
    try:
        module = sla.build({"variant": "_pickled_user", "alpha": 2.0})
        back = pickle.loads(pickle.dumps(module))
        q, k, v = qkv()
        torch.testing.assert_close(back(q, k, v), 2.0 * v)
    finally:
        sla.unregister_variant("_pickled_user")
