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
that never read runs pay nothing.

It also makes the UI backend answer sooner. At start-up it starts its caches one after the other,
and each start is a new Python process (a cache server) that must import the Metaflow client before
it answers: about 2.5 s each under proot, and the UI backend listens only once all have answered.
Here they start side by side; each is still started, and checked, exactly as before.

This runs inside the container's own Python: standard library only.
"""

import asyncio
import importlib.abc
import importlib.machinery
import sys


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


async def _already_started():
    return None


def _start_side_by_side(module):
    cache_store = getattr(module, "CacheStore", None)
    original = getattr(cache_store, "start_caches", None)
    if original is None or getattr(original, "_side_by_side", False):
        return

    async def start_caches(self, app):
        stores = [getattr(self, name) for name in ("artifact_cache", "dag_cache", "log_cache", "card_cache")
                  if hasattr(self, name)]
        await asyncio.gather(*(store.start_cache() for store in stores))
        # The original then runs as it would, but finds each store started: for that one call, a
        # store's start_cache is a no-op; later restarts of a cache use the real one again.
        for store in stores:
            store.start_cache = _already_started
        try:
            await original(self, app)
        finally:
            for store in stores:
                del store.start_cache

    start_caches._side_by_side = True
    cache_store.start_caches = start_caches


# What to change in which module, right after that module is first imported.
_PATCHES = {
    "metaflow.datastore.flow_datastore": _guard,
    "services.ui_backend_service.data.cache.store": _start_side_by_side,
}


class _Loader(importlib.abc.Loader):
    def __init__(self, inner, patch):
        self._inner = inner
        self._patch = patch

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._inner.exec_module(module)
        self._patch(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        patch = _PATCHES.get(fullname)
        if patch is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader, patch)
        return spec


sys.meta_path.insert(0, _Finder())
