"""Loaded by every Python process of the UI backend: the stack puts this folder first on their PYTHONPATH.

It works around a bug of the Metaflow client inside the service image (2.19.x; the official
v2.5.1 image carries 2.19.34). When the UI backend asks for a task's log size, the client builds
that task's datastore with a placeholder `{"objects": {}, "info": {}}` and saves it in its disk
cache (METAFLOW_CLIENT_CACHE_PATH) as the task's metadata. Every later artifact read for the task
trusts the placeholder and fails (TypeError in `get_artifact_sizes`), even after a restart.

The image is what users pull, so the fix lives on our side and stays narrow: the client's task
metadata cache never stores, and never hands out, metadata that lists no objects. A finished task
always has objects, so nothing real is lost; a bad entry left by an earlier run reads as a miss and
is replaced. Nothing changes until `metaflow.datastore.flow_datastore` is imported, so processes
that never read runs pay nothing. This runs inside the container's own Python: standard library only.
"""

import importlib.abc
import importlib.machinery
import sys

_TARGET = "metaflow.datastore.flow_datastore"


def _lists_objects(metadata):
    return isinstance(metadata, dict) and bool(metadata.get("objects"))


class _CompleteMetadataOnly:
    """A task metadata cache that passes through only metadata naming the task's objects."""

    def __init__(self, inner):
        self._inner = inner

    def load_metadata(self, run_id, step_name, task_id, attempt):
        found = self._inner.load_metadata(run_id, step_name, task_id, attempt)
        return found if _lists_objects(found) else None

    def store_metadata(self, run_id, step_name, task_id, attempt, metadata_dict):
        if _lists_objects(metadata_dict):
            self._inner.store_metadata(run_id, step_name, task_id, attempt, metadata_dict)


def _guard(module):
    flow_datastore = getattr(module, "FlowDataStore", None)
    original = getattr(flow_datastore, "set_metadata_cache", None)
    if original is None or getattr(original, "_complete_metadata_only", False):
        return

    def set_metadata_cache(self, cache):
        original(self, None if cache is None else _CompleteMetadataOnly(cache))

    set_metadata_cache._complete_metadata_only = True
    flow_datastore.set_metadata_cache = set_metadata_cache


class _Loader(importlib.abc.Loader):
    def __init__(self, inner):
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._inner.exec_module(module)
        _guard(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


sys.meta_path.insert(0, _Finder())
