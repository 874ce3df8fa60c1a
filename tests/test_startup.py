"""utils/startup.py: the entry scripts import their libraries with the collector off, then freeze what the
imports created; garbage from before the block is still collected, and LLMQAT_IMPORT_GC=1 leaves all as it was."""
import ast
import gc
import subprocess
import sys
import weakref

import pytest

from conftest import REPO, REPO_PATH
from utils.startup import imports_without_gc


class Node:
    pass


@pytest.fixture
def collector():
    """The collector on for the test, then as the test found it (what a test froze stays frozen: the worker's
    objects, frozen after collection anyway, and a few thousand of the test's)."""
    was_on = gc.isenabled()
    gc.enable()
    yield
    (gc.enable if was_on else gc.disable)()


def cycle():
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)


def test_off_inside_the_block_then_frozen_and_on(collector, monkeypatch):
    monkeypatch.delenv("LLMQAT_IMPORT_GC", raising=False)
    before = cycle()  # garbage from before the block: collected, not frozen
    frozen = gc.get_freeze_count()
    with imports_without_gc():
        assert before() is None and not gc.isenabled()
        made = [Node() for _ in range(1000)]
        inside = cycle()  # the imports' own cyclic garbage: kept (frozen), never traversed
    assert gc.isenabled() and gc.get_freeze_count() >= frozen + len(made)
    gc.collect()
    assert inside() is not None


def test_import_gc_1_or_an_already_disabled_collector_changes_nothing(collector, monkeypatch):
    """Nothing is frozen: a freeze would add the block's 1000 live objects. (The count itself is not fixed: a
    frozen object freed by reference counting, anywhere in the worker, leaves it.)"""
    monkeypatch.setenv("LLMQAT_IMPORT_GC", "1")
    frozen = gc.get_freeze_count()
    with imports_without_gc():
        assert gc.isenabled()
        made = [Node() for _ in range(1000)]
    assert gc.get_freeze_count() < frozen + len(made)
    monkeypatch.delenv("LLMQAT_IMPORT_GC")
    gc.disable()
    frozen = gc.get_freeze_count()
    with imports_without_gc():
        assert not gc.isenabled()
        made = [Node() for _ in range(1000)]
    assert not gc.isenabled() and gc.get_freeze_count() < frozen + len(made)


SCRIPTS = ("train.py", "eval.py", "generate_data.py", "merge_gen_data.py", "prepare_eval_data.py")


@pytest.mark.parametrize("script", SCRIPTS)
def test_entry_scripts_import_their_libraries_inside_the_block(script):
    """Every top-level import after utils.startup's sits in the block (export.py imports in main(), also in it)."""
    tree = ast.parse((REPO_PATH / script).read_text())
    imports = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert [ast.unparse(n) for n in imports if "startup" not in ast.unparse(n)] in ([], ["import logging"])
    blocks = [n for n in tree.body if isinstance(n, ast.With) and ast.unparse(n.items[0]) == "imports_without_gc()"]
    assert len(blocks) == 1 and all(isinstance(n, (ast.Import, ast.ImportFrom)) for n in blocks[0].body)


def test_train_py_starts_with_its_imports_frozen_and_the_collector_on():
    code = "import gc, train; print(gc.isenabled(), gc.get_freeze_count())"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    on, frozen = out.split()
    assert on == "True" and int(frozen) > 100_000  # transformers' and torch's objects
