"""A few lines of pytest for machines without it (a GPU box with no package registry).

``scripts/gpu_check.sh`` uses pytest when it can be imported, else this: it provides what
``tests/gpu`` uses (``mark.parametrize``, autouse ``fixture``s taking ``monkeypatch``,
``tmp_path``, ``raises``) and runs every ``test_*`` of the given files, printing one line per
test and a pytest-like summary; exit status 1 if any failed. Run as
``python tests/gpu/mini_pytest.py [--collect-only] tests/gpu/test_*.py``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import os
import sys
import tempfile
import traceback
import types
from pathlib import Path


class _Mark:
    def parametrize(self, names, values, ids=None):
        names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)

        def deco(fn):
            fn._params = getattr(fn, "_params", []) + [(names, list(values), ids)]
            return fn
        return deco

    def __getattr__(self, name):  # slow, cuda, ...: labels only
        return lambda *a, **k: (a[0] if a and callable(a[0]) else (lambda fn: fn))


def fixture(fn=None, autouse=False, scope="function"):
    def deco(f):
        f._fixture, f._autouse = True, autouse
        return f
    return deco(fn) if fn is not None else deco


@contextlib.contextmanager
def raises(exc, match=None):
    import re
    try:
        yield
    except exc as err:
        if match is not None and not re.search(match, str(err)):
            raise AssertionError(f"{exc.__name__} raised but {match!r} not in {err}") from err
        return
    raise AssertionError(f"did not raise {exc.__name__}")


class _MonkeyPatch:
    def __init__(self):
        self.undo = []

    def delenv(self, name, raising=True):
        if name in os.environ:
            self.undo.append(lambda v=os.environ.pop(name): os.environ.__setitem__(name, v))

    def setenv(self, name, value):
        old = os.environ.get(name)
        os.environ[name] = value
        self.undo.append(lambda: os.environ.pop(name) if old is None else os.environ.__setitem__(name, old))

    def setattr(self, obj, name, value):
        old = getattr(obj, name)
        setattr(obj, name, value)
        self.undo.append(lambda: setattr(obj, name, old))

    def close(self):
        for fn in reversed(self.undo):
            fn()


def install() -> types.ModuleType:
    mod = types.ModuleType("pytest")
    mod.mark, mod.fixture, mod.raises = _Mark(), fixture, raises
    mod.skip = lambda reason="": (_ for _ in ()).throw(_Skip(reason))
    sys.modules["pytest"] = mod
    return mod


class _Skip(Exception):
    pass


def _cases(fn):
    params = getattr(fn, "_params", [])
    grids = [[dict(zip(names, v if len(names) > 1 else (v,))) for v in values] for names, values, _ in params]
    for combo in itertools.product(*grids) if grids else [()]:
        kw = {k: v for d in combo for k, v in d.items()}
        yield kw


def run(files: list[str], collect_only: bool = False) -> int:
    install()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    passed = failed = 0
    for file in files:
        spec = importlib.util.spec_from_file_location(Path(file).stem, file)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        autouse = [f for f in vars(mod).values() if getattr(f, "_autouse", False)]
        for name, fn in sorted(vars(mod).items()):
            if not name.startswith("test_") or not callable(fn):
                continue
            for kw in _cases(fn):
                if collect_only:
                    print(f"COLLECTED {file}::{name}{kw or ''}", flush=True)
                    continue
                ok = _one(fn, kw, autouse)
                passed, failed = passed + ok, failed + (not ok)
                print(f"{'PASSED' if ok else 'FAILED'} {file}::{name}{kw or ''}", flush=True)
    print(f"{passed} passed, {failed} failed", flush=True)
    return 1 if failed else 0


def _one(fn, kw, autouse) -> bool:
    mp = _MonkeyPatch()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            args = {"tmp_path": Path(tmp), "monkeypatch": mp}
            for f in autouse:
                gen = f(**{k: args[k] for k in f.__code__.co_varnames[:f.__code__.co_argcount]})
                if hasattr(gen, "__next__"):
                    next(gen, None)
            wanted = fn.__code__.co_varnames[:fn.__code__.co_argcount]
            fn(**{k: (kw[k] if k in kw else args[k]) for k in wanted})
        return True
    except BaseException:  # noqa: BLE001 - report and go on to the next test
        traceback.print_exc()
        return False
    finally:
        mp.close()


if __name__ == "__main__":
    argv = sys.argv[1:]
    sys.exit(run([a for a in argv if a != "--collect-only"], collect_only="--collect-only" in argv))
