"""The registry-wide conformance suite, and the proof that a new variant needs no new test code.

Every registered variant, with its defaults and each entry of its ``VariantSpec.examples``, goes
through ``sla.testing.check_variant``: every backend this machine can run, forward and
gradients, against the variant's ``math`` backend in float64 and (exact variants) a float64
masked softmax over ``sla.dense_mask``. A toy variant registered here — one fast function, its
reference and its mask, one registration — is picked up by the same parametrisation, passes,
and fails with a message naming the case once its fast path is broken.
"""

from __future__ import annotations

import functools
import math
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch
from _env import imported_modules
from torch import nn

import sparse_linear_attn as sla
from sparse_linear_attn import registry
from sparse_linear_attn.backends.math import dense_attention, masked_softmax
from sparse_linear_attn.inputs import causal_mask, causal_offset, full_visibility
from sparse_linear_attn.registry import Impl, Param, VariantSpec, int_at_least

testing = sla.testing


pytestmark = pytest.mark.usefixtures("one_thread")


@functools.cache
def _compile_problem() -> str | None:
    """Why torch.compile'd FlexAttention cannot run on this machine (None: it can)."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        q = torch.randn(1, 1, 128, 16)
        bm = create_block_mask(lambda b, h, i, j: j <= i, None, None, 128, 128, device="cpu")
        torch.compile(flex_attention, dynamic=False)(q, q, q, block_mask=bm)
        return None
    except Exception as e:  # no C++ compiler, unsupported platform...
        return f"{type(e).__name__}: {str(e)[:200]}"


@pytest.mark.parametrize("case", testing.conformance_cases(), ids=lambda c: c.id)
def test_registered_variant_conforms(case):
    backends = list(case.backends or registry.get(case.variant).backends)
    compiled = [b for b in backends if b in testing.COMPILED_BACKENDS]
    try:
        report = testing.check_variant(case.variant, backends=backends, **case.params)
    except AssertionError as e:
        # Only where a compiled backend cannot compile at all (no C++ compiler...) do the others
        # run alone; the probe costs a compile, so it runs only after a backend raised.
        if not compiled or e.__cause__ is None or _compile_problem() is None:
            raise
        warnings.warn(f"{compiled} left out of {case.id}: {_compile_problem()}", stacklevel=1)
        backends = [b for b in backends if b not in compiled]
        report = testing.check_variant(case.variant, backends=backends, **case.params)
    # Every case the variant takes ran somewhere: a backend ruled out everywhere cannot hide one.
    ran = {label for labels in report.ran.values() for label in labels}
    variant_skips = {label for skips in report.skipped.values() for label, why in skips if why.startswith("variant")}
    assert ran | variant_skips == {c.label for c in testing.CASES}, str(report)


def test_every_variant_and_example_is_parametrised():
    cases = testing.conformance_cases()
    assert len({c.id for c in cases}) == len(cases)
    assert len({c.label for c in testing.CASES}) == len(testing.CASES)
    for name in sla.available_variants():
        spec = registry.get(name)
        assert [c.params for c in cases if c.variant == name] == [{}, *spec.examples]
        for example in spec.examples:
            spec.resolve_params(example)  # an invalid example is an error here, not a skip
        # A compiled backend (seconds per graph) runs with one parameter set per variant.
        for b in set(spec.backends) & testing.COMPILED_BACKENDS:
            assert sum(c.backends is None or b in c.backends for c in cases if c.variant == name) == 1


# ---------------------------------------------------------------------------------------------
# A toy variant: dilated attention, query i sees keys j = i' + m·dilation, |m·dilation| <= window
# (causal: m <= 0), with i' = i + Nk − Nq.


def dilated_mask(nq: int, nk: int, *, causal: bool = False, window: int = 4, dilation: int = 2) -> torch.Tensor:
    d = torch.arange(nk)[None, :] - (torch.arange(nq)[:, None] + causal_offset(nq, nk))
    keep = (d.abs() <= window) & (d % dilation == 0)
    return keep & (d <= 0) if causal else keep


def dilated_reference(q, k, v, *, causal, key_padding_mask, scale, return_weights=False, window=4, dilation=2):
    """Dense masked softmax over ``dilated_mask``: the toy's ``math`` backend."""
    nq, nk = q.shape[2], k.shape[2]
    pattern = dilated_mask(nq, nk, causal=causal, window=window, dilation=dilation).to(q.device)
    mask = full_visibility(nq, nk, causal=causal, key_padding_mask=key_padding_mask, pattern=pattern)
    return dense_attention(q, k, v, scale=scale, mask=mask, return_weights=return_weights)


def dilated_fast(q, k, v, *, causal, key_padding_mask, scale, return_weights=False, window=4, dilation=2, bug=None):
    """Each query gathers its ``2·window/dilation + 1`` keys: O(Nq·window/dilation·D).

    ``bug`` plants one mistake, to show the conformance check catches it.
    """
    B, H, nq, D = q.shape
    nk, group = k.shape[2], H // k.shape[1]
    work = torch.promote_types(q.dtype, torch.float32)
    reach = window // dilation * dilation
    last = 0 if causal else reach
    if bug == "causal-band" and causal:
        last += dilation  # off by one step: a causal query sees one key of its future
    offsets = torch.arange(-reach, last + 1, dilation, device=q.device)
    j = torch.arange(nq, device=q.device)[:, None] + causal_offset(nq, nk) + offsets  # (nq, K)
    ok = ((j >= 0) & (j < nk)).expand(B, nq, -1)
    j = j.clamp(0, nk - 1)
    if key_padding_mask is not None:
        ok = ok & ~key_padding_mask[:, j]
    ok = ok[:, None]  # (B, 1, nq, K)
    kg = k.repeat_interleave(group, 1)[:, :, j].to(work)  # (B, H, nq, K, D)
    vg = v.repeat_interleave(group, 1)[:, :, j].to(work)
    s = (q.to(work)[:, :, :, None, :] * kg).sum(-1) * (1 / math.sqrt(D) if bug == "scale" else scale)
    seen = ok.any(-1, keepdim=True)
    if bug == "empty-rows":
        p = torch.softmax(s.masked_fill(~ok, -math.inf), -1)
    else:
        p = torch.softmax(s.masked_fill(~ok, -math.inf).masked_fill(~seen, 0.0), -1) * seen
    return (p[..., None] * vg).sum(-2).to(q.dtype), None


def dilated_spec(name: str = "toy_dilated", bug: str | None = None) -> VariantSpec:
    fast = dilated_fast if bug in (None, "math-ignores-padding") else functools.partial(dilated_fast, bug=bug)
    reference = dilated_reference
    if bug == "math-ignores-padding":

        def reference(q, k, v, *, key_padding_mask, **kw):
            return dilated_reference(q, k, v, key_padding_mask=None, **kw)

    return VariantSpec(
        name=name,
        summary="toy: exact softmax over keys dilation apart within window",
        exact=True,
        cost="O(N·window/dilation·D)",
        params={
            "window": Param("window", 4, "reach on each side", int_at_least(0)),
            "dilation": Param("dilation", 2, "step between seen keys", int_at_least(1)),
        },
        impls={"torch": Impl(fast), "math": Impl(reference)},
        mask_fn=dilated_mask,
        examples=({"window": 7, "dilation": 3}, {"window": 0}),
    )


@pytest.fixture
def register():
    added = []

    def add(spec):
        registry.add(spec)
        added.append(spec.name)
        return spec.name

    yield add
    for name in added:
        sla.unregister_variant(name)


def test_toy_variant_is_covered_without_new_test_code(register):
    assert not any(c.variant == "toy_dilated" for c in testing.conformance_cases())
    name = register(dilated_spec())
    cases = [c for c in testing.conformance_cases() if c.variant == name]
    assert [c.id for c in cases] == ["toy_dilated-defaults", "toy_dilated-window=7,dilation=3", "toy_dilated-window=0"]
    for case in cases:
        report = case.run()
        # The toy takes no dropout; math ran every other case.
        assert len(report.ran["math"]) == sum(not c.dropout for c in testing.CASES)
        # torch does not return weights: every other case ran on it.
        assert len(report.ran["torch"]) == sum(not c.weights and not c.dropout for c in testing.CASES)
        assert {why for _, why in report.skipped["torch"]} == {
            "does not return attention weights (use backend='math' or 'auto')",
            "variant does not take attention dropout",
        }


def _failing_case(message: str, variant: str, backend: str) -> testing.Case:
    head = f"check_variant({variant!r}): backend {backend!r}, case '"
    assert message.startswith(head), message
    label = message[len(head) :].split("'")[0]
    (case,) = [c for c in testing.CASES if c.label == label]
    return case


@pytest.mark.parametrize(
    "bug, backend, what, case_has",
    [
        # A future key shows up as a wrong value, or as a row that should see nothing seeing it.
        ("causal-band", "torch", "differs from backend 'math' in float64|exact zero row", lambda c: c.causal),
        ("scale", "torch", "differs from backend 'math' in float64", lambda c: c.scale is not None),
        ("empty-rows", "torch", "non-finite", lambda c: c.causal or c.padding == "row"),
        (
            "math-ignores-padding",
            "math",
            "differs from the float64 masked softmax|exact zero row",
            lambda c: c.padding != "none",
        ),
    ],
)
def test_broken_toy_variant_fails_naming_the_case(register, bug, backend, what, case_has):
    name = register(dilated_spec("toy_broken", bug))
    with pytest.raises(AssertionError) as info:
        testing.check_variant(name)
    message = str(info.value)
    case = _failing_case(message, name, backend)
    assert case_has(case), message
    assert re.search(what, message), message
    if "differs" in message:  # the size of the error and the tolerance it broke
        assert "max |error|" in message and "> tolerance" in message and "at index" in message


# ---------------------------------------------------------------------------------------------
# nn.Module variants (learned parameters): invariants, and the float64 twin for lower precisions.


class GatedDot(nn.Module):
    """softmax(q·k·scale·g) over visible keys, with a learned gate g; ``leak`` ignores causal."""

    def __init__(self, leak: bool = False):
        super().__init__()
        self.gate = nn.Parameter(torch.tensor(1.5))
        self.leak = leak

    def forward(self, q, k, v, *, causal, key_padding_mask, scale):
        work = torch.promote_types(q.dtype, torch.float32)
        s = q.to(work) @ k.to(work).transpose(-1, -2) * scale * self.gate.to(work)
        mask = causal_mask(q.shape[2], k.shape[2], device=q.device) if causal and not self.leak else None
        if key_padding_mask is not None:
            kp = ~key_padding_mask[:, None, None, :]
            mask = kp if mask is None else mask & kp
        return (masked_softmax(s, mask) @ v.to(work)).to(q.dtype)


def test_module_variant_passes_and_a_causal_leak_fails():
    sla.register_variant("toy_gated", exact=False)(GatedDot)
    try:
        report = testing.check_variant("toy_gated")
        assert len(report.ran["module"]) == sum(not c.weights and not c.dropout for c in testing.CASES)
        with pytest.raises(AssertionError, match="rows that cannot see the changed keys") as info:
            testing.check_variant("toy_gated", leak=True)
        assert _failing_case(str(info.value).replace(", leak=True", ""), "toy_gated", "module").causal
    finally:
        sla.unregister_variant("toy_gated")


def test_user_function_variant_is_checked_against_the_definition():
    def softmax_attention(q, k, v, *, causal, key_padding_mask, scale, leak=False):
        work = torch.promote_types(q.dtype, torch.float32)
        s = q.to(work) @ k.to(work).transpose(-1, -2) * scale
        mask = full_visibility(q.shape[2], k.shape[2], causal=causal and not leak, key_padding_mask=key_padding_mask)
        return (masked_softmax(s, mask) @ v.to(work)).to(q.dtype)

    sla.register_variant("toy_user", exact=True)(softmax_attention)
    try:
        report = testing.check_variant("toy_user")
        assert len(report.ran["user"]) == sum(not c.weights and not c.dropout for c in testing.CASES)
        with pytest.raises(AssertionError, match="differs from the float64 masked softmax|exact zero row") as info:
            testing.check_variant("toy_user", leak=True)
        assert _failing_case(str(info.value).replace(", leak=True", ""), "toy_user", "user").causal
    finally:
        sla.unregister_variant("toy_user")


# ---------------------------------------------------------------------------------------------
# The check's own interface.


def test_a_backend_that_raises_is_a_failure_naming_the_case(register):
    def crashes_on_padding(q, k, v, *, key_padding_mask, **kw):
        if key_padding_mask is not None:
            raise RuntimeError("no padding here")
        return dilated_fast(q, k, v, key_padding_mask=None, **kw)

    spec = dilated_spec("toy_crash")
    spec.impls["torch"] = Impl(crashes_on_padding)
    name = register(spec)
    with pytest.raises(AssertionError, match="the call raised RuntimeError: no padding here") as info:
        testing.check_variant(name)
    assert _failing_case(str(info.value), name, "torch").padding != "none"
    assert isinstance(info.value.__cause__, RuntimeError)


def test_check_variant_rejects_unknown_names():
    with pytest.raises(ValueError, match=r"'windw' \(did you mean 'window'\?\)"):
        testing.check_variant("sliding_window", windw=3)
    with pytest.raises(ValueError, match=r"unknown backend of variant 'full' 'tourch'.*'torch'"):
        testing.check_variant("full", backends=["tourch"])
    with pytest.raises(ValueError, match="unknown variant 'ful'"):
        testing.check_variant("ful")


def test_report_lists_what_ran_and_why_the_rest_was_skipped():
    report = testing.check_variant("full", backends=["torch", "xformers"])
    text = str(report)
    assert text.startswith("check_variant('full'): passed")
    assert f"torch: {sum(not c.weights for c in testing.CASES)} case(s) passed" in text
    if not torch.cuda.is_available():
        assert report.ran["xformers"] == [] and "runs on cuda only" in text


def test_the_library_does_not_import_testing_or_pytest():
    package = Path(sla.__file__).parent
    for path in sorted(package.rglob("*.py")):
        imported = imported_modules(path, package)
        assert not any(m == "pytest" or m.startswith("pytest.") for m in imported), f"{path} imports pytest"
        if path.name != "testing.py":
            assert "sparse_linear_attn.testing" not in imported, f"{path} imports sparse_linear_attn.testing"
    # ...and attribute access loads it on demand.
    assert sla.testing is sys.modules["sparse_linear_attn.testing"]
