"""The deployment classes as a replica receives them: `@serve.deployment` pickles the class by value
when it is decorated, so the replica's copy of each method sees only the module globals that existed
at that moment. A name defined below the class is a NameError in the replica, on a path (e.g. the
error handling of a dead engine replica) that may run only in production. No Ray cluster needed."""

from __future__ import annotations

import builtins
import dis
import inspect
import types

import cloudpickle
import pytest


def global_loads(code: types.CodeType) -> set[str]:
    """Names `code` (and every function, generator or closure nested in it) loads as globals."""
    names = {ins.argval for ins in dis.get_instructions(code) if ins.opname in ("LOAD_GLOBAL", "LOAD_NAME")}
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= global_loads(const)
    return names


def own_functions(cls: type, module: str):
    """(name, function) for the methods `module` defines on `cls` (not Serve's wrapper class)."""
    for name, member in inspect.getmembers(cls):
        fn = member.fget if isinstance(member, property) else getattr(member, "__func__", member)
        if isinstance(fn, types.FunctionType) and fn.__module__ == module:
            yield name, fn


@pytest.mark.parametrize("module, attr", [("llmplatform.serving.ingress", "OpenAIIngress"),
                                          ("llmplatform.serving.replica", "EngineReplica")])
def test_every_global_a_deployment_uses_reaches_its_replica(module, attr):
    import importlib

    deployment = getattr(importlib.import_module(module), attr)
    shipped = cloudpickle.loads(deployment._replica_config.serialized_deployment_def)  # what the replica unpickles
    missing = {}
    for name, fn in own_functions(shipped, module):
        lost = {g for g in global_loads(fn.__code__) if g not in fn.__globals__ and not hasattr(builtins, g)}
        if lost:
            missing[name] = sorted(lost)
    assert not missing, (f"{module}.{attr}: names undefined in the replica (define them above the decorated class): {missing}")
