"""The optimizer step: order of operations, accumulation scaling, clipping, the non-finite guard."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from configs.schema import ModelConfig
from ml.models import build_model
from ml.step import Accumulator, train_step


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelConfig(name="mlp"), 10, 1)   # no BatchNorm: batch split doesn't matter


def data(n: int = 32, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g)


def disabled_scaler():
    return torch.amp.GradScaler("cpu", enabled=False)


def run_groups(model, x, y, micro: int, accum: int, **kw):
    """Feed x in micro-batches of ``micro`` through train_step like train_one_epoch does."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = []
    original = opt.step
    opt.step = lambda *a, **k: (calls.append(1), original(*a, **k))[1]
    acc, n_micro, results = Accumulator(), -(-len(y) // micro), []
    scaler = kw.pop("scaler", None) or disabled_scaler()
    for i in range(n_micro):
        start = i - i % accum
        n_in = min(accum, n_micro - start)
        r = train_step(model, x[i * micro:(i + 1) * micro], y[i * micro:(i + 1) * micro], nn.CrossEntropyLoss(),
                       opt, scaler, acc, n_micro=n_in,
                       boundary=i == start + n_in - 1, **kw)
        results.append(r)
    return calls, results


def test_accumulating_4x8_matches_one_batch_of_32():
    x, y = data(32)
    a, b = mlp(), mlp()
    calls_a, ra = run_groups(a, x, y, micro=8, accum=4)
    calls_b, rb = run_groups(b, x, y, micro=32, accum=1)
    assert len(calls_a) == len(calls_b) == 1
    assert ra[-1].loss == pytest.approx(rb[-1].loss, rel=1e-5)
    assert ra[-1].grad_norm == pytest.approx(rb[-1].grad_norm, rel=1e-4)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_partial_final_group_is_scaled_by_its_real_size():
    # 5 micro-batches of 8 with accum 4: groups of 4 and 1; the last one must equal a batch of 8.
    x, y = data(40)
    a = mlp()
    calls, results = run_groups(a, x, y, micro=8, accum=4)
    assert len(calls) == 2 and [r.stepped for r in results] == [False, False, False, True, True]
    ref = mlp()
    run_groups(ref, x[:32], y[:32], micro=32, accum=1)
    _, last = run_groups(ref, x[32:], y[32:], micro=8, accum=1)
    assert results[-1].loss == pytest.approx(last[-1].loss, rel=1e-5)
    for p, q in zip(a.parameters(), ref.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_step_count_with_accumulation():
    x, y = data(80)
    calls, results = run_groups(mlp(), x, y, micro=8, accum=4)   # 10 micro-batches -> 4 + 4 + 2
    assert len(calls) == 3
    assert [i for i, r in enumerate(results) if r.stepped] == [3, 7, 9]


def test_clipping_acts_on_unscaled_gradients():
    x, y = data(32)
    ref = mlp()
    _, r_ref = run_groups(ref, x, y, micro=32, accum=1)      # unclipped reference: true grad norm
    model = mlp()
    before = [p.detach().clone() for p in model.parameters()]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)   # a real scaler: loss x 4096
    _, r = run_groups(model, x, y, micro=32, accum=1, scaler=scaler, grad_clip=0.05)
    assert r[-1].grad_norm == pytest.approx(r_ref[-1].grad_norm, rel=1e-4)   # reported norm is unscaled
    assert r_ref[-1].grad_norm > 0.05
    update = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters())])
    # SGD lr 0.1 without momentum: the update is 0.1 x the clipped gradient, of norm 0.1 x 0.05
    assert update.norm().item() == pytest.approx(0.1 * 0.05, rel=1e-3)


class RecordingScaler:
    """Fake GradScaler that records the order of calls and the grad norm the optimizer sees."""

    def __init__(self, model, scale=1024.0):
        self.model, self.s, self.calls = model, scale, []

    def is_enabled(self):
        return True

    def get_scale(self):
        return self.s

    def scale(self, loss):
        self.calls.append("scale")
        return loss * self.s

    def unscale_(self, optimizer):
        self.calls.append("unscale_")
        for p in self.model.parameters():
            if p.grad is not None:
                p.grad.div_(self.s)

    def step(self, optimizer):
        norm = torch.nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None])
        self.calls.append(("step", float(norm)))
        optimizer.step()

    def update(self):
        self.calls.append("update")


def test_order_scale_unscale_clip_step_update_zero_grad():
    model = mlp()
    scaler = RecordingScaler(model)
    x, y = data(16)
    _, results = run_groups(model, x, y, micro=8, accum=2, scaler=scaler, grad_clip=0.01)
    names = [c if isinstance(c, str) else c[0] for c in scaler.calls]
    assert names == ["scale", "scale", "unscale_", "step", "update"]
    assert scaler.calls[3][1] == pytest.approx(0.01, rel=1e-4)       # clipped before the step
    assert results[-1].grad_norm > 0.01
    assert all(p.grad is None for p in model.parameters())           # zero_grad(set_to_none=True)


def test_fp16_autocast_with_grad_scaler_on_cpu():
    """A real fp16 step: the forward runs in half precision, the scaler's factor is taken out before
    the norm is reported, and the optimizer steps exactly once. A scale of 2**4 cannot overflow here."""
    x, y = data(32)
    ref = mlp()
    _, r_ref = run_groups(ref, x, y, micro=16, accum=2)                   # fp32 reference
    model = mlp()
    dtypes = []
    model.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    before = [p.detach().clone() for p in model.parameters()]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    calls, results = run_groups(model, x, y, micro=16, accum=2, scaler=scaler, amp_dtype=torch.float16)
    assert dtypes == [torch.float16, torch.float16]                       # autocast really ran
    assert results[-1].stepped and not results[-1].skipped and len(calls) == 1
    assert results[-1].grad_norm == pytest.approx(r_ref[-1].grad_norm, rel=2e-2)   # unscaled
    assert results[-1].loss == pytest.approx(r_ref[-1].loss, rel=2e-2)
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert scaler.get_scale() == 2.0**4                                   # no overflow: scale kept


def test_fp16_overflow_skips_the_step_and_lowers_the_scale():
    """Inf gradients under fp16: no error (the scaler handles it), no optimizer step, weights unchanged."""
    model = mlp()
    model.net[4].weight.register_hook(lambda g: torch.full_like(g, float("inf")))
    before = [p.detach().clone() for p in model.parameters()]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    x, y = data(16)
    calls, results = run_groups(model, x, y, micro=16, accum=1, scaler=scaler, amp_dtype=torch.float16)
    assert results[-1].stepped and results[-1].skipped and calls == []
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert scaler.get_scale() == 2.0**3


def test_nonfinite_gradient_names_the_parameter():
    model = mlp()
    with torch.no_grad():
        model.net[1].weight[0, 0] = float("nan")
    x, y = data(8)
    with pytest.raises(ValueError, match=r"non-finite loss.*net\.1\.weight"):
        run_groups(model, x, y, micro=8, accum=1)


def test_nonfinite_gradient_with_finite_loss():
    model = mlp()
    model.net[4].weight.register_hook(lambda g: torch.full_like(g, float("inf")))
    x, y = data(8)
    with pytest.raises(ValueError, match=r"non-finite gradient.*net\.4\.weight"):
        run_groups(model, x, y, micro=8, accum=1)


def test_overfits_a_single_batch():
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="small_cnn"), 10, 1)
    x, y = data(16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses, acc = [], Accumulator()
    for _ in range(60):
        r = train_step(model, x, y, nn.CrossEntropyLoss(), opt, disabled_scaler(), acc, n_micro=1, boundary=True)
        losses.append(r.loss)
    assert losses[-1] < 0.1 * losses[0], losses[::10]
