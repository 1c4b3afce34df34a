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

And it keeps idle memory down. Each cache server forks its pool of workers (one each here) when it
starts, and so holds ~50 MiB of processes that, until the UI reads a run, do nothing. Here a pool
forks its workers when an action is handed to it, and they leave once the pool has been idle for
POOL_IDLE_S: an idle UI backend holds no workers, and the next read costs one fork.

This runs inside the container's own Python: standard library only.
"""

import asyncio
import importlib.abc
import importlib.machinery
import os
import sys
import threading

# How long a cache server's pool keeps its worker processes once no action is running (the stack
# sets it with the UI backend's other tuning).
POOL_IDLE_S = float(os.environ.get("MFSTACK_CACHE_POOL_IDLE_S", "30"))


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


class _PoolOnDemand:
    """The part of `multiprocessing.Pool` a cache server uses, whose processes exist only while there is work.

    They are forked when an action is handed over and leave once none has been running for
    POOL_IDLE_S. Callbacks run on the pool's result thread, and the retirement on a timer's, hence the lock.
    """

    def __init__(self, *args, **kwargs):
        self._arguments = (args, kwargs)
        self._pool = None
        self._running = 0
        self._retirement = None
        self._terminated = None  # a pool terminate() stopped, until join() waits for it
        self._lock = threading.Lock()

    def apply_async(self, func, args=(), kwds=None, callback=None, error_callback=None):
        with self._lock:
            if self._retirement is not None:
                self._retirement.cancel()
                self._retirement = None
            if self._pool is None:
                import multiprocessing

                pool_args, pool_kwargs = self._arguments
                self._pool = multiprocessing.Pool(*pool_args, **pool_kwargs)
            self._running += 1
            pool = self._pool
        return pool.apply_async(func, args, kwds or {}, callback=self._then_count(callback),
                                error_callback=self._then_count(error_callback))

    def _then_count(self, inner):
        def finished(result):
            try:
                if inner is not None:
                    inner(result)
            finally:
                with self._lock:
                    self._running -= 1
                    if self._running == 0 and self._pool is not None:
                        self._retirement = threading.Timer(POOL_IDLE_S, self._retire)
                        self._retirement.daemon = True
                        self._retirement.start()
        return finished

    def _retire(self):
        with self._lock:
            # Only the timer still in charge retires: a cancelled one may already have been running.
            # That one is set only while no action runs and a pool exists.
            if self._retirement is not threading.current_thread():
                return
            pool, self._pool, self._retirement = self._pool, None, None
        pool.close()
        pool.join()

    def terminate(self):
        with self._lock:
            if self._retirement is not None:
                self._retirement.cancel()
                self._retirement = None
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.terminate()
            self._terminated = pool

    def join(self):
        if self._terminated is not None:
            self._terminated.join()


class _MultiprocessingWithPoolOnDemand:
    """The cache server's view of `multiprocessing`: the same module, but its Pools wait for work."""

    Pool = _PoolOnDemand

    def __getattr__(self, name):
        return getattr(sys.modules["multiprocessing"], name)


_CACHE_SERVER = "services.ui_backend_service.data.cache.client.cache_server"


def _pools_on_demand(_module):
    # The cache server runs as `python -m ...cache_server`, so it is `__main__` and no import of
    # it can be intercepted; its first import after `multiprocessing` is its worker module.
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if getattr(spec, "name", None) == _CACHE_SERVER and \
            getattr(main, "multiprocessing", None) is sys.modules.get("multiprocessing"):
        main.multiprocessing = _MultiprocessingWithPoolOnDemand()


# What to change in which module, right after that module is first imported.
_PATCHES = {
    "metaflow.datastore.flow_datastore": _guard,
    "services.ui_backend_service.data.cache.store": _start_side_by_side,
    "services.ui_backend_service.data.cache.client.cache_worker": _pools_on_demand,
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
