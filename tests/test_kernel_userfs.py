"""The kernel's cache of adapters exported from the file store keeps what is used."""
import os
import time
from types import SimpleNamespace

from llmos.kernel.userfs import prune_cache


def test_the_cache_keeps_recent_exports_and_whatever_is_in_use(tmp_path):
    dirs = []
    for i in range(6):
        d = tmp_path / f"h{i}"
        d.mkdir()
        os.utime(d, (time.time() - 100 + i, time.time() - 100 + i))     # h5 newest
        dirs.append(d)
    driver = SimpleNamespace(adapters=lambda: [{"name": str(dirs[1])}])
    k = SimpleNamespace(
        table=SimpleNamespace(all=lambda: [SimpleNamespace(adapter=str(dirs[0])), SimpleNamespace(adapter=None)]),
        procs=SimpleNamespace(models=SimpleNamespace(entries={"m": SimpleNamespace(engine=None, host_driver=driver)})))
    prune_cache(k, tmp_path, keep=2)
    assert sorted(d.name for d in tmp_path.iterdir()) == ["h0", "h1", "h4", "h5"]
