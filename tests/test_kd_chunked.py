"""The chunked KD loss equals the plain F.kl_div formula, and keeps far less memory."""
import json
import os
import subprocess
import sys

import pytest
import torch

from utils import kd_trainer
from utils.kd_trainer import kd_loss

from conftest import REPO_PATH as REPO  # noqa: E402


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_chunked_equals_plain_loss_and_gradient(monkeypatch, dtype, tol):
    monkeypatch.setattr(kd_trainer, "KD_CHUNK_ELEMENTS", 7 * 1000)  # 7 tokens a chunk: 11 chunks, the last short
    torch.manual_seed(0)
    student = (torch.randn(3, 25, 1000) * 3).to(dtype).requires_grad_()
    teacher = (torch.randn(3, 25, 1000) * 3).to(dtype)
    loss = kd_loss(student, teacher)
    plain = kd_loss(student, teacher, chunked=False)
    assert loss.dtype == plain.dtype == torch.float32
    torch.testing.assert_close(loss, plain, rtol=1e-6, atol=0)
    grad = torch.autograd.grad(2.5 * loss, student)[0]
    grad_plain = torch.autograd.grad(2.5 * plain, student)[0]
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.float(), grad_plain.float(), rtol=tol, atol=tol * 1e-1)


def test_teacher_that_needs_a_gradient_gets_the_plain_formula():
    s, t = torch.randn(2, 3, 10, requires_grad=True), torch.randn(2, 3, 10, requires_grad=True)
    kd_loss(s, t).backward()
    assert t.grad is not None and t.grad.abs().sum() > 0


def saved_bytes(fn):
    """Bytes autograd keeps for the backward of fn()."""
    sizes = []

    def pack(t):
        sizes.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(sizes)


def test_saves_only_one_logits_sized_gradient():
    student = torch.randn(2, 64, 1000, requires_grad=True)
    teacher = torch.randn(2, 64, 1000)
    full = student.numel() * 4
    assert saved_bytes(lambda: kd_loss(student, teacher, chunked=False)) >= 2 * full  # two fp32 log-softmaxes
    assert saved_bytes(lambda: kd_loss(student, teacher)) == full
    assert saved_bytes(lambda: kd_loss(student.bfloat16(), teacher.bfloat16())) == full // 2


PROBE = """
import json, sys, torch
from utils.kd_trainer import kd_loss
def rss(field):
    return next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith(field))
chunked = sys.argv[1] == '1'
s = torch.randn(2, 512, 32000, requires_grad=True)
t = torch.randn(2, 512, 32000)
kd_loss(s[:, :4], t[:, :4], chunked).backward()
s.grad = None
open('/proc/self/clear_refs', 'w').write('5')  # reset the peak RSS to now
base = rss('VmRSS:')
kd_loss(s, t, chunked).backward()
print(json.dumps(rss('VmHWM:') - base))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_peak_memory_of_loss_and_backward_is_lower():
    """Measured as peak RSS above the inputs, in fresh processes; glibc returns freed tensors (mmap threshold)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=str(REPO))
    peak = {c: json.loads(subprocess.run([sys.executable, "-c", PROBE, c], env=env, check=True, cwd=REPO,
                                         capture_output=True, text=True).stdout) for c in ("0", "1")}
    logits = 2 * 512 * 32000 * 4
    assert peak["1"] < 2.3 * logits  # the saved gradient and the returned one: nothing fp32-vocab-sized else
    assert peak["0"] > 4 * logits  # the plain formula: log-softmaxes, exp, products, gradients
